"""Bytes a site sends per federated round, against the size of the backbone, for each method.

A site sends exactly its trainable state (client/client_app.py), so the payload is the trainable numel
times the element size; the backbone is every parameter of the model. Both are counted on the meta
device for the exact published configs, so nothing is allocated or downloaded.

    python benchmarks/federated_bytes.py [--out benchmarks/results]

Writes federated_bytes.json and federated_bytes.png (share of the backbone per method and model, with
the 2 % line). Flower adds a small header per tensor on the wire (numpy .npy framing, < 200 bytes each).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dpmemarc_core.methods import METHODS, apply  # noqa: E402
from dpmemarc_core.models import build_from_config, published_config  # noqa: E402

MODELS = {"gpt2-large": "generation", "roberta-large": "classification"}
# Each method at its paper defaults; LoRA and rev at rank 8 and at the rank 1 of the default federated run
# config and the quick preset; side at the quick preset's reduction 16.
VARIANTS = [(method, {}) for method in METHODS] + [
    ("lora", {"r": 8}), ("lora", {"r": 1}), ("side", {"reduction": 16}), ("rev", {"r": 8}), ("rev", {"r": 1})]
GOAL = 0.02


def measure(model_name: str, task_kind: str, method: str, options: dict) -> dict:
    model = build_from_config(published_config(model_name), task_kind, device="meta")
    backbone = sum(p.numel() * p.element_size() for p in model.parameters())
    model = apply(model, method, **options)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    sent = sum(p.numel() * p.element_size() for _, p in trainable)
    return {"model": model_name, "method": method, "options": options, "backbone_bytes": backbone,
            "bytes_per_round": sent, "tensors": len(trainable), "share": sent / backbone,
            "dtype": str(trainable[0][1].dtype) if trainable else None}


def plot(rows: list[dict], path: Path) -> None:
    labels = [r["method"] + ("" if not r["options"] else " " + ",".join(f"{k}={v}" for k, v in r["options"].items()))
              for r in rows if r["model"] == next(iter(MODELS))]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(MODELS)
    for i, model_name in enumerate(MODELS):
        shares = [100 * r["share"] for r in rows if r["model"] == model_name]
        ax.bar([x + i * width for x in range(len(shares))], shares, width, label=model_name)
    ax.axhline(100 * GOAL, color="black", linestyle="--", linewidth=1, label=f"{100 * GOAL:g} % goal")
    ax.set_yscale("log")
    ax.set_xticks([x + width * (len(MODELS) - 1) / 2 for x in range(len(labels))], labels, rotation=20)
    ax.set_ylabel("bytes sent per site per round (% of backbone)")
    ax.set_title("Federated payload: trainable state only (fp32, exact configs on the meta device)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [measure(m, kind, method, options) for m, kind in MODELS.items() for method, options in VARIANTS]
    print(f"{'model':<14} {'method':<24} {'backbone MB':>12} {'sent MB':>10} {'share':>8}")
    for r in rows:
        name = r["method"] + (f" {r['options']}" if r["options"] else "")
        print(f"{r['model']:<14} {name:<24} {r['backbone_bytes'] / 1e6:>12.1f} {r['bytes_per_round'] / 1e6:>10.2f} "
              f"{100 * r['share']:>7.3f}%")
    (args.out / "federated_bytes.json").write_text(json.dumps({"goal_share": GOAL, "rows": rows}, indent=1) + "\n")
    plot(rows, args.out / "federated_bytes.png")
    print(f"wrote {args.out / 'federated_bytes.json'} and {args.out / 'federated_bytes.png'}")


if __name__ == "__main__":
    main()
