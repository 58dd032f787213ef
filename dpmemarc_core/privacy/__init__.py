"""Differential privacy: BK clipping engine, noise, accounting, sampling, settings."""

from dpmemarc_core.privacy.accountant import PrivacyAccountant, epsilon, noise_multiplier_for
from dpmemarc_core.privacy.engine import BKEngine
from dpmemarc_core.privacy.sampling import PoissonBatchSampler
from dpmemarc_core.privacy.settings import PrivacySettings

__all__ = ["BKEngine", "PoissonBatchSampler", "PrivacyAccountant", "PrivacySettings", "epsilon",
           "noise_multiplier_for"]
