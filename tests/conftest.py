"""Test-wide settings: tiny models run fastest single-threaded (thread start-up dominates their matmuls), and
sites keep their privacy records in a temporary directory, never in the user's home."""

import importlib
import os
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Callable

import pytest
import torch

torch.set_num_threads(1)
# Inherited by the Flower processes the end-to-end tests start (their simulated sites have no state-dir).
os.environ.setdefault("DPMEMARC_STATE_DIR", tempfile.mkdtemp(prefix="dpmemarc-test-site-state-"))


@pytest.fixture
def benchmark_script(monkeypatch) -> Callable[[str], ModuleType]:
    """Import a script from benchmarks/ by module name: they are run as files, not installed as a package."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    return importlib.import_module
