"""Per-layer time of BK's two forms of a weight's per-example gradient, and what the mixed rule picks.

For each layer shape (rows × cols, a of width rows, g of width cols, B × T tokens) this times, in one process,
what BK does with the layer in one step: the ghost form (the two T×T Grams for the squared norms, then the
clipped sum (c·g)ᵀa) against the instantiated form (the per-example gradients (B, rows, cols), their squared
norms, then Σ_b c_b G_b), with the library's own functions. The shapes are GPT-2 small's and LoRA r=64's.

    python benchmarks/ghost_rule.py                  # B=8, T=128, torch's threads
    python benchmarks/ghost_rule.py --seq-len 512 --threads 1

Prints a table and writes benchmarks/results/ghost_rule_<B>_<T>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from dpmemarc_core.privacy.layers.contributions import (
    Factored,
    GhostRule,
    factored_clipped_sum,
    factored_inner,
    instantiated_clipped_sum,
)

# name → (rows = width of a, cols = width of g)
SHAPES = {
    "LoRA A (c_attn, r=64)": (768, 64),
    "LoRA B (c_attn, r=64)": (64, 2304),
    "c_attn": (768, 2304),
    "attn c_proj": (768, 768),
    "mlp c_fc": (768, 3072),
    "mlp c_proj": (3072, 768),
}


def forms(a: torch.Tensor, g: torch.Tensor, scale: torch.Tensor):
    def ghost() -> torch.Tensor:
        f = Factored(left=a, right=g)
        factored_inner(f, f)
        return factored_clipped_sum(f, scale, (a.shape[-1], g.shape[-1]))

    def instantiated() -> torch.Tensor:
        per_example = torch.einsum("bti,btj->bij", a, g)
        per_example.flatten(1).pow(2).sum(1)
        return instantiated_clipped_sum(per_example, scale)

    return {"ghost": ghost, "instantiated": instantiated}


def time_forms(rows: int, cols: int, batch: int, seq_len: int, repeats: int, rounds: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(batch, seq_len, rows, generator=generator)
    g = torch.randn(batch, seq_len, cols, generator=generator)
    scale = torch.rand(batch, generator=generator)
    timed = forms(a, g, scale)
    for fn in timed.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in timed}
    for r in range(rounds):
        # alternate the order, so drift in the machine's load favours neither form
        for name in (list(timed) if r % 2 == 0 else list(timed)[::-1]):
            start = time.perf_counter()
            for _ in range(repeats):
                timed[name]()
            times[name].append((time.perf_counter() - start) / repeats * 1e3)
    factored = GhostRule("mixed", set())(torch.empty(rows, cols), a, g)
    return {"rows": rows, "cols": cols, "ms": {name: statistics.median(t) for name, t in times.items()},
            "ms_rounds": times, "rule_picks": "ghost" if factored else "instantiated"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=10, help="calls per timing")
    parser.add_argument("--rounds", type=int, default=5, help="timings per form (median shown)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    for name in ("batch_size", "seq_len", "repeats", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be an integer >= 1, got {getattr(args, name)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = {}
    print(f"B={args.batch_size} T={args.seq_len} threads={torch.get_num_threads()}; ms per layer and step")
    print(f"{'layer':24s} {'ghost':>8s} {'inst.':>8s} {'faster':>13s} {'rule picks':>13s}")
    for name, (r, c) in SHAPES.items():
        cell = time_forms(r, c, args.batch_size, args.seq_len, args.repeats, args.rounds)
        rows[name] = cell
        faster = min(cell["ms"], key=cell["ms"].get)
        print(f"{name:24s} {cell['ms']['ghost']:8.2f} {cell['ms']['instantiated']:8.2f} {faster:>13s} "
              f"{cell['rule_picks']:>13s}", flush=True)
    out = args.out or Path(__file__).parent / "results" / f"ghost_rule_b{args.batch_size}_t{args.seq_len}.json"
    out.write_text(json.dumps({"batch_size": args.batch_size, "seq_len": args.seq_len,
                               "threads": torch.get_num_threads(), "torch": torch.__version__, "layers": rows},
                              indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
