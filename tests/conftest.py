"""Test-wide settings: tiny models run fastest single-threaded (thread start-up dominates their matmuls), and
sites keep their privacy records in a temporary directory, never in the user's home."""

import os
import tempfile

import torch

torch.set_num_threads(1)
# Inherited by the Flower processes the end-to-end tests start (their simulated sites have no state-dir).
os.environ.setdefault("DPMEMARC_STATE_DIR", tempfile.mkdtemp(prefix="dpmemarc-test-site-state-"))
