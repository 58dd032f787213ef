"""Time of one DP training step per fine-tuning method, as a ratio to a non-DP LoRA step, on GPT-2 small.

A step is exactly what `dpmemarc train` runs per batch: `make_trainer(method, ...).step(batch)` —
forward, per-example causal-LM loss, BK clipped backward (for `rev` the method's backward passes, 'auto'),
Gaussian noise, Adam; for `zo` (DPZero) two forwards along a seeded direction, the clipped and noised
scalar, and the SGD update. Methods run with their library defaults (LoRA r=64, adapter bottleneck 64,
side reduction 8, rev r=64; zo perturbs every weight, `zo_params` "full"), DP with σ=1, C=1, ε finite.

    python benchmarks/method_speed.py --threads 1 --warmup 1 --steps 3            # CPU, B=8, T=128
    python benchmarks/method_speed.py --rows nondp-lora dp-rev dp-rev-1pass        # a subset

Each row runs in its own subprocess (shared helpers and caveats in step_speed.py): on a machine shared
with other work, the process CPU time of a one-thread run is the figure that measures this code.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from step_speed import (
    RESULT_TAG,
    add_timing_arguments,
    check_timing_arguments,
    combine,
    machine_facts,
    measure,
    print_table,
    random_ids,
    run_rounds,
    timing_flags,
    with_ratios,
    write_results,
)

BASELINE = "nondp-lora"
NOISE_MULTIPLIER = 1.0
MAX_GRAD_NORM = 1.0
# Any finite ε makes the trainer private; σ is given directly, so its value moves no work.
EPSILON = 8.0

# row → (method, backward passes for rev or None, private, description)
ROWS: dict[str, tuple[str, int | None, bool, str]] = {
    "nondp-lora": ("lora", None, False, "non-DP LoRA r=64 (peft), plain backward"),
    "nondp-side": ("side", None, False, "non-DP side network, reduction 8, plain backward"),
    "nondp-rev": ("rev", None, False, "non-DP reversible, plain backward through the replay"),
    "dp-full": ("full", None, True, "DP full fine-tuning, BK"),
    "dp-lora": ("lora", None, True, "DP LoRA r=64, BK"),
    "dp-adapter": ("adapter", None, True, "DP Houlsby adapter, bottleneck 64, BK"),
    "dp-bitfit": ("bitfit", None, True, "DP BiTFiT (biases), BK"),
    "dp-side": ("side", None, True, "DP side network, reduction 8, BK"),
    "dp-rev": ("rev", None, True, "DP reversible, BK, backward passes 'auto' (the method's choice)"),
    "dp-rev-2pass": ("rev", 2, True, "DP reversible, BK, 2 backward passes"),
    "dp-rev-1pass": ("rev", 1, True, "DP reversible, BK, 1 backward pass"),
    "dp-zo": ("zo", None, True, "DPZero, forward only, all weights perturbed"),
    # rev at the quick preset's rank: its 'auto' backward passes keep r=1's small buffers and run one pass.
    "nondp-rev-r1": ("rev", None, False, "non-DP reversible, LoRA r=1 and adapter bottleneck 1"),
    "dp-rev-r1": ("rev", None, True, "DP reversible, r=1, BK, backward passes 'auto'"),
}
ROW_OPTIONS: dict[str, dict] = {"nondp-rev-r1": {"r": 1}, "dp-rev-r1": {"r": 1}}  # method options; else defaults


def stack(examples: list[dict]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([example[key] for example in examples]) for key in examples[0]}


def build_trainer(row: str, model_name: str, batch_size: int, seq_len: int, device: torch.device):
    """The trainer `dpmemarc train` would build for this row, over one fixed batch; and its batch indices."""
    from dpmemarc_core.methods import apply
    from dpmemarc_core.models import build_from_config, published_config
    from dpmemarc_core.privacy import PrivacySettings
    from dpmemarc_core.training.build import make_trainer
    method, backward_passes, private, _ = ROWS[row]
    config = published_config(model_name)
    torch.manual_seed(0)
    model = build_from_config(config, "generation", device=device)
    # zo perturbs the trainable part of another method; "full" is train()'s default zo_params.
    model = apply(model, "full" if method == "zo" else method, **ROW_OPTIONS.get(row, {}))
    if backward_passes is not None:
        model.recommended_backward_passes = backward_passes  # the trainer reads it to configure BK
    ids = random_ids(batch_size, seq_len, config.vocab_size, torch.device("cpu"))
    examples = [{"input_ids": row_ids, "labels": row_ids} for row_ids in ids]
    privacy = PrivacySettings(target_epsilon=EPSILON if private else math.inf, delta=1e-5,
                              max_grad_norm=MAX_GRAD_NORM)
    trainer = make_trainer(method, model, examples, stack, privacy, sample_rate=1.0,
                           noise_multiplier=NOISE_MULTIPLIER if private else 0.0, device=device, noise_seed=0)
    return trainer, list(range(batch_size))


def run_row(args: argparse.Namespace) -> dict:
    from dpmemarc_core.training.loop import StepStats
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    trainer, indices = build_trainer(args.one, args.model, args.batch_size, args.seq_len, device)
    stats = StepStats()
    result = measure(lambda: trainer.step(indices, stats), device, args.warmup, args.steps)
    trainable = sum(p.numel() for p in trainer.params)
    return {**result, "trainable_parameters": trainable, "train_loss": stats.as_dict()["train_loss"]}


def markdown(results: dict[str, dict], args: argparse.Namespace) -> str:
    lines = [f"{args.model}, B={args.batch_size}, T={args.seq_len}, {args.threads} thread(s), {args.warmup} warm-up "
             f"+ median of {args.steps} steps, {args.repeats} round(s); × = ratio to {BASELINE}.", "",
             "| row | what | trainable params | CPU s/step | × (CPU) | wall s/step | × (wall) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for row, cell in results.items():
        if cell["status"] != "ok":
            lines.append(f"| {row} | {cell['description']} | | failed: {cell['error'][:150]} | | | |")
            continue
        trainable = cell["rounds"][0].get("trainable_parameters", 0)
        lines.append(f"| {row} | {cell['description']} | {trainable / 1e6:.2f}M | {cell['median_cpu_s']:.2f} | "
                     f"**{cell.get('cpu_time_ratio', math.nan):.2f}** | {cell['median_s']:.2f} | "
                     f"{cell.get('time_ratio', math.nan):.2f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_timing_arguments(parser)
    parser.add_argument("--model", default="gpt2",
                        help="a published config name (dpmemarc_core/configs) or a path to a causal-LM config.json; "
                             "random weights")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--one", choices=list(ROWS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    check_timing_arguments(parser, args)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.one:
        print(RESULT_TAG + json.dumps(run_row(args)), flush=True)
        return
    machine = machine_facts(args.device)
    rows = list(dict.fromkeys([BASELINE, *args.rows]))
    rounds = run_rounds(rows, lambda r: ROWS[r][3],
                        lambda r: [sys.executable, __file__, "--one", r, "--model", args.model, *timing_flags(args)],
                        args.repeats)
    results = {r: {"method": ROWS[r][0], "description": ROWS[r][3], **combine(runs)} for r, runs in rounds.items()}
    with_ratios(results, lambda r: BASELINE)
    print_table(results, args.threads, baseline=BASELINE)
    out = Path(args.out or Path(__file__).parent / "results" / f"method_speed_{args.device}.json")
    write_results(out, args, machine, model=f"{args.model} config, random weights",
                  dp={"noise_multiplier": NOISE_MULTIPLIER, "max_grad_norm": MAX_GRAD_NORM, "clip_fn": "abadi",
                      "clipping_mode": "mixed"}, results=results)
    out.with_suffix(".md").write_text(markdown(results, args))
    print(f"wrote {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
