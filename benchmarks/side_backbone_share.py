"""Is caching the side network's frozen backbone states worth it? The share of a side step spent in the backbone.

`side` runs the frozen backbone under no_grad and trains only the ladder network beside it, so the backbone's
layer outputs for an example are the same every epoch; a cache could skip that forward from the second epoch
on. This times `dpmemarc train --method side`'s own step (the preset's config, the library's trainer: Poisson
batch, BK clipping, noise, DP-Adam) on the offline MiniLM + movie snippets and, inside it, the backbone's
forward (`SideTunedModel.backbone_states`). What a cache could save at most is that share of every epoch
after the first; what it would cost is the states themselves, (layers + 1) × T × d numbers per example.

The library keeps such a cache when a run draws each example more than once in expectation
(`methods/side/state_cache.py`). `--epochs E` also times that, A/B in one process: E epochs over the first
`--examples` training snippets at the preset's batch, once as one run (cached) and once as one-step runs
(each draws every example less than once, so nothing is cached).

    python benchmarks/side_backbone_share.py                      # quick preset, 6 steps, all threads
    python benchmarks/side_backbone_share.py --preset long --steps 3 --threads 1
    python benchmarks/side_backbone_share.py --epochs 4 --examples 1024
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dpmemarc_core.data import load_task, num_labels_of
from dpmemarc_core.privacy import PrivacySettings
from dpmemarc_core.training.build import build_run, make_trainer
from dpmemarc_core.training.config import planned_steps, sample_rate_for
from dpmemarc_core.training.presets import PRESETS, preset_config


def side_run(preset: str, seed: int, max_train: int | None = None):
    cfg = preset_config(preset, "side", seed=seed)
    run = build_run(cfg.model, "classification", "side", num_labels=num_labels_of(cfg.task),
                    method_options=cfg.method_options, precision=cfg.precision, device="cpu", seed=seed)
    task = load_task(cfg.task, run.tokenizer, max_length=cfg.max_length, max_train=max_train or cfg.max_train,
                     max_eval=1, seed=seed)
    return cfg, run, task


def side_trainer(cfg, run, task):
    # σ does not change the step's work; 1.0 stands in for the preset's (no accounting is reported here).
    return make_trainer("side", run.model, task.train, task.collate, PrivacySettings(target_epsilon=8.0),
                        sample_rate_for(cfg.batch_size, len(task.train)), 1.0, lr=cfg.lr, head_lr=cfg.head_lr,
                        device=run.device, precision=run.precision)


def measure_cache(preset: str, epochs: float, examples: int, seed: int) -> dict:
    """Wall time of `epochs` epochs over `examples` snippets, cached (one run) against not (one-step runs)."""
    seconds = {}
    for mode in ("cached", "computed"):
        cfg, run, task = side_run(preset, seed, examples)
        trainer = side_trainer(cfg, run, task)
        steps = max(1, round(epochs / trainer.sample_rate))
        start = time.perf_counter()
        if mode == "cached":
            trainer.run(steps, progress=False)
        else:
            for _ in range(steps):
                trainer.run(1, progress=False)
        seconds[mode] = time.perf_counter() - start
    return {"epochs": epochs, "examples": len(task.train), "batch_size": cfg.batch_size, "steps": steps,
            "cached_seconds": seconds["cached"], "computed_seconds": seconds["computed"],
            "speedup": seconds["computed"] / seconds["cached"]}


def measure(preset: str, steps: int, seed: int) -> dict:
    cfg, run, task = side_run(preset, seed)
    model = run.model
    n = len(task.train)
    backbone_seconds = [0.0]
    untimed = model.backbone_states

    def timed_backbone_states(*args, **kwargs):
        start = time.perf_counter()
        try:
            return untimed(*args, **kwargs)
        finally:
            backbone_seconds[0] += time.perf_counter() - start

    model.backbone_states = timed_backbone_states  # instance attribute: this process's model only
    trainer = side_trainer(cfg, run, task)
    trainer.run(1, progress=False)  # warm-up step, not timed
    backbone_seconds[0] = 0.0
    start = time.perf_counter()
    trainer.run(steps, progress=False)
    total = time.perf_counter() - start
    family = model.family
    states_per_example = (len(family.layers) + 1) * cfg.max_length * family.hidden
    epochs = cfg.epochs
    share = backbone_seconds[0] / total
    # With a cache, epochs after the first skip the backbone: the run's time falls by share × (E - 1) / E.
    saving = share * max(epochs - 1, 0) / epochs
    return {"preset": preset, "batch_size": cfg.batch_size, "max_length": cfg.max_length, "epochs": epochs,
            "run_steps": planned_steps(cfg, n), "timed_steps": steps, "threads": torch.get_num_threads(),
            "step_seconds": total / steps, "backbone_seconds_per_step": backbone_seconds[0] / steps,
            "backbone_share": share, "largest_run_time_saving": saving, "train_examples": n,
            "cache_bytes_fp32_at_max_length": 4 * states_per_example * n,
            "cache_bytes_bf16_at_max_length": 2 * states_per_example * n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="quick", choices=PRESETS)
    parser.add_argument("--steps", type=int, default=6, help="timed steps (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=float, default=None, help="also time the cache over this many epochs")
    parser.add_argument("--examples", type=int, default=1024, help="training snippets of the --epochs timing")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/side_backbone_share.json"))
    args = parser.parse_args()
    if args.steps < 1:
        parser.error(f"--steps must be an integer >= 1, got {args.steps}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    result = measure(args.preset, args.steps, args.seed)
    print(f"side, {args.preset} preset (B={result['batch_size']}, T={result['max_length']}, "
          f"{result['epochs']:g} epoch(s), {result['threads']} thread(s)): {result['step_seconds']:.2f} s per step, "
          f"backbone forward {result['backbone_seconds_per_step']:.2f} s ({100 * result['backbone_share']:.0f} %)")
    print(f"over this preset's {result['epochs']:g} epoch(s) a cache of the backbone's states saves at most "
          f"{100 * result['largest_run_time_saving']:.0f} % of the run; at full length it would hold "
          f"{result['cache_bytes_bf16_at_max_length'] / 2**30:.1f} GiB in bf16 "
          f"({result['cache_bytes_fp32_at_max_length'] / 2**30:.1f} GiB fp32) for {result['train_examples']} examples")
    if args.epochs is not None:
        result["cache"] = measure_cache(args.preset, args.epochs, args.examples, args.seed)
        timing = result["cache"]
        print(f"{timing['epochs']:g} epochs over {timing['examples']} snippets ({timing['steps']} steps at batch "
              f"{timing['batch_size']}): {timing['computed_seconds']:.0f} s computing the backbone every step, "
              f"{timing['cached_seconds']:.0f} s with the cache ({timing['speedup']:.2f}x)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
