"""Differential privacy: BK clipping engine, noise, accounting, sampling, settings."""

from dpmemarc_core.privacy.engine import BKEngine

__all__ = ["BKEngine"]
