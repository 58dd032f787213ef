"""Cost of secure mode: Gaussian noise for every trainable parameter, default vs `secure_mode`.

Default noise is torch's generator (its state filled from OS entropy); secure mode draws from the kernel's
CSPRNG (`os.urandom`) and sums 4 Gaussians per coordinate (`dpmemarc_core.privacy.randomness`). Both are
timed as `privatize_gradients` on the trainable parameters of GPT-2 small (shapes of the real layers, as
`dpmemarc train` would noise them), interleaved round by round, wall time with all threads.

    python benchmarks/secure_noise.py                       # LoRA r=64 on c_attn, and full fine-tuning
    python benchmarks/secure_noise.py --rounds 5 --out benchmarks/results/secure_noise.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from dpmemarc_core.methods import apply
from dpmemarc_core.privacy.noise import privatize_gradients
from dpmemarc_core.privacy.randomness import PrivateRandomness

METHODS = {"lora": {"r": 64}, "full": {}}


def trainable_params(method: str) -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    model = apply(GPT2LMHeadModel(GPT2Config()), method, **METHODS[method])
    return [p for p in model.parameters() if p.requires_grad]


def time_noise(params: list[torch.nn.Parameter], randomness: PrivateRandomness) -> float:
    for p in params:
        p.grad = torch.zeros_like(p)
    start = time.perf_counter()
    privatize_gradients(params, 1.0, 1.0, 8.0, randomness)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/secure_noise.json"))
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    results = {"threads": torch.get_num_threads(), "rounds": args.rounds, "rows": {}}
    print(f"{'trainable part':<28} {'parameters':>12} {'default s':>10} {'secure s':>10} {'ratio':>7}")
    for method in METHODS:
        params = trainable_params(method)
        default, secure = PrivateRandomness("cpu"), PrivateRandomness("cpu", secure=True)
        time_noise(params, default)  # warm-up
        times = {"default": [], "secure": []}
        for _ in range(args.rounds):  # interleaved, so machine load affects both alike
            times["default"].append(time_noise(params, default))
            times["secure"].append(time_noise(params, secure))
        row = {"parameters": sum(p.numel() for p in params),
               **{f"{k}_seconds": statistics.median(v) for k, v in times.items()}, "samples": times}
        row["ratio"] = row["secure_seconds"] / row["default_seconds"]
        results["rows"][f"gpt2-{method}"] = row
        print(f"{'GPT-2 small ' + method:<28} {row['parameters']:>12,} {row['default_seconds']:>10.4f} "
              f"{row['secure_seconds']:>10.4f} {row['ratio']:>7.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
