"""Peak memory of a training step: meta-device simulation of exact configs, CUDA measurement, the planner."""
