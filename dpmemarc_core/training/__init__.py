"""Training: the one step loop, the BK and DPZero trainers, run settings and presets, the single-site run."""
