"""Work functions for simulations.common.run_cells in spawned processes (a test's own functions would make each
child import the whole test module)."""

import os


def process_facts() -> dict:
    import torch

    return {"pid": os.getpid(), "threads": torch.get_num_threads()}


def fails() -> dict:
    raise ValueError("not supported here")
