"""Issue 15: simulated peak of a DP rev step (B=32, T=128, bf16, meta device), before/after, and over depth.

Trees (same commit, see rev_speed.py): OLDSIM = before (inversion code, k=1, original emulation);
OLD = old rev + this issue's emulation fix; NEWSIM = new rev + original emulation; NEW = new rev + fix.
Every cell is one `dpmemarc memory --model M --method rev --device meta --json [--method-option ...]`
process run with PYTHONPATH=<tree>.

    python rev_memory.py OLDSIM OLD NEWSIM NEW CONFIG_DIR OUT.json
"""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

oldsim, old, newsim, new, config_dir, out = sys.argv[1:7]
trees = {"old, original emulation": oldsim, "old, fixed emulation": old, "new, original emulation": newsim,
         "new": new}
cells = []

def run(tree, model, options=()):
    cmd = ["dpmemarc", "memory", "--model", model, "--method", "rev", "--device", "meta", "--json"]
    for o in options:
        cmd += ["--method-option", o]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": tree}, cwd=tree)
    line = next(l for l in proc.stdout.splitlines() if l.startswith("{"))
    r = json.loads(line)
    b = r["breakdown"]
    weights = b["weights_bytes"]
    state = b["trainable_params_bytes"] + b["grads_bytes"] + b["optimizer_state_bytes"] + b["optimizer_temporaries_bytes"]
    cell = {"tree": tree, "model": model, "options": list(options), "command": " ".join(cmd),
            "peak_gib": r["peak_gib"], "peak_minus_weights_gib": (r["peak_bytes"] - weights) / 2**30,
            "activations_and_engine_gib": (b["activations_bytes"] + b["logits_bytes"] + b["engine_buffers_bytes"]) / 2**30,
            "trainable_state_gib": state / 2**30, "peak_phase": r["peak_phase"], "breakdown": b}
    print(json.dumps({k: v for k, v in cell.items() if k != "breakdown"}), flush=True)
    return cell

for model in ("roberta-large", "gpt2-large"):
    for label, tree in trees.items():
        cells.append({"label": label, **run(tree, model)})
    cells.append({"label": "new, segment_size=1", **run(new, model, ["segment_size=1"])})

# Depth series: the roberta-large config with 6, 24, 96 layers (everything else as published).
for layers in (6, 24, 96):
    cfg = json.load(open(Path(new) / "dpmemarc_core/configs/roberta-large.json"))
    cfg["num_hidden_layers"] = layers
    path = Path(config_dir) / f"roberta-large-L{layers}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    json.dump(cfg, open(path, "w"), indent=1)
    cells.append({"label": f"new, L={layers}", "layers": layers, **run(new, str(path))})
    cells.append({"label": f"old (fixed emulation), L={layers}", "layers": layers, **run(old, str(path))})
json.dump({"command": " ".join(sys.argv), "cells": cells}, open(out, "w"), indent=1)
