"""How much of this machine's RAM a run may still take: one answer for every budget that reads it."""

from __future__ import annotations

import psutil


def available_ram_bytes() -> int:
    """RAM that new allocations can take without swapping (psutil's `available`: free pages plus the caches the
    kernel gives back on demand, which is what a run can actually grow into; free pages alone undercount it)."""
    return int(psutil.virtual_memory().available)
