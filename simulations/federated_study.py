"""Federated study: central accuracy per round for 3 and 10 sites, IID vs Dirichlet(α) label skew, each site
at ε = 8, next to single-site DP training on the pooled data, over several seeds.

Every configuration runs the real apps (the ServerApp's round loop, the ClientApp, validation, checkpoints)
in one process through `server.local_grid.InProcessGrid`, so no SuperLink or Ray is needed. The pooled
baseline is the same code with one site holding every example: same steps per round, batch size, ε and δ.
A seed fixes the initialisation, the split and the sites' partitions; batches and noise are OS entropy.

    python simulations/federated_study.py                 # about 25 CPU-minutes per seed at the defaults
    python simulations/federated_study.py --seeds 0 --rounds 2 --local-steps 2 --max-train 600 --max-eval 100

Writes <out>/federated_study.json (each round's accuracy per seed, and its mean ± sd over seeds) and .png (the
mean with ± sd error bars); each run's metrics.jsonl and checkpoints are kept in
<out>/federated_study/<name>/seed<s>/ (a re-run resumes finished and unfinished runs alike).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

# client/ and server/ are the Flower apps' modules; Flower imports them from the app's root, so do we.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from client.client_app import app as client_app
from dpmemarc_core.federated.config import FederatedConfig
from server.checkpoint import read_metrics
from server.local_grid import InProcessGrid
from server.server_app import run_rounds
from simulations.common import mean_sd

# name: (sites, partitioning)
CONFIGURATIONS = {
    "pooled, 1 site": (1, "iid"),
    "3 sites, IID": (3, "iid"),
    "3 sites, Dirichlet": (3, "dirichlet"),
    "10 sites, IID": (10, "iid"),
    "10 sites, Dirichlet": (10, "dirichlet"),
}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "results" / "federated")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds; each configuration runs once per seed")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.005)
    parser.add_argument("--rank", type=int, default=1, help="LoRA rank (1, as the default run config)")
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--delta", type=float, default=1e-4,
                        help="the same δ at every site and for the pooled run (default 1e-4 < 1/N pooled)")
    parser.add_argument("--alpha", type=float, default=0.3, help="Dirichlet concentration of the skewed splits")
    parser.add_argument("--max-train", type=int, default=6000, help="pooled training examples")
    parser.add_argument("--max-eval", type=int, default=300)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--task", default="movie-sentiment")
    args = parser.parse_args()
    seeds = [int(seed) for seed in args.seeds.split(",") if seed.strip()]
    started = time.perf_counter()
    runs_dir = args.out / "federated_study"
    results = {}
    for name, (sites, partitioning) in CONFIGURATIONS.items():
        runs = {}
        for seed in seeds:
            output = runs_dir / name.replace(", ", "-").replace(" ", "-").lower() / f"seed{seed}"
            run_config = {
                "model": args.model, "task": args.task, "method": "lora",
                "method-options": json.dumps({"r": args.rank}), "num-server-rounds": args.rounds,
                "local-steps": args.local_steps, "batch-size": args.batch_size, "lr": args.lr,
                "target-epsilon": args.epsilon, "delta": args.delta, "partitioning": partitioning,
                "dirichlet-alpha": args.alpha, "max-train": args.max_train, "max-eval": args.max_eval,
                "max-length": args.max_length, "seed": seed, "device": "cpu", "min-valid-replies": 1,
                "min-train-nodes": 1, "output-dir": str(output),
            }
            begun, cpu = time.perf_counter(), cpu_seconds()
            run_rounds(InProcessGrid(client_app, run_config, sites), FederatedConfig.from_run_config(run_config))
            # Time spent on this run, summed over invocations (a resumed one adds only its rounds).
            timing_file = output / "study-timing.json"
            timing = (json.loads(timing_file.read_text()) if timing_file.is_file()
                      else {"seconds": 0.0, "cpu_seconds": 0.0})
            timing = {"seconds": timing["seconds"] + time.perf_counter() - begun,
                      "cpu_seconds": timing["cpu_seconds"] + cpu_seconds() - cpu}
            timing_file.write_text(json.dumps(timing) + "\n")
            metrics = read_metrics(output)
            last = metrics[-1]
            runs[str(seed)] = {
                "accuracy": [m["accuracy"] for m in metrics], "eval_loss": [m["eval"]["loss"] for m in metrics],
                "epsilon_per_site": last.get("epsilon"),
                "examples_per_site": {str(c["node"]): c.get("num-examples") for c in last.get("clients", [])},
                **timing, "run_config": run_config,
            }
            print(f"{name}, seed {seed}: accuracy per round {[round(a, 4) for a in runs[str(seed)]['accuracy']]}",
                  flush=True)
        rounds = range(args.rounds + 1)
        results[name] = {
            "sites": sites, "partitioning": partitioning, "seeds": runs,
            "accuracy": [mean_sd([run["accuracy"][r] for run in runs.values()]) for r in rounds],
            "eval_loss": [mean_sd([run["eval_loss"][r] for run in runs.values()]) for r in rounds],
            "seconds": sum(run["seconds"] for run in runs.values()),
        }
    wall = time.perf_counter() - started
    summary = {"settings": vars(args) | {"out": str(args.out)}, "results": results, "wall_seconds": wall}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "federated_study.json").write_text(json.dumps(summary, indent=1) + "\n")

    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, result in results.items():
        style = {"marker": "o", "capsize": 3, "linestyle": "--" if result["sites"] == 1 else "-", "label": name}
        for ax, key in ((acc_ax, "accuracy"), (loss_ax, "eval_loss")):
            ax.errorbar(range(len(result[key])), [p["mean"] for p in result[key]],
                        yerr=[p["sd"] or 0.0 for p in result[key]], **style)
    for ax, label in ((acc_ax, "central accuracy"), (loss_ax, "central eval loss")):
        ax.set_xlabel("round (0: starting model)")
        ax.set_ylabel(f"{label} (mean ± sd over {len(seeds)} seed(s))")
    acc_ax.legend(fontsize=8)
    fig.suptitle(f"LoRA r={args.rank} on {args.model} / {args.task}, ε={args.epsilon:g} per site, δ={args.delta:g}, "
                 f"Dirichlet α={args.alpha:g}; {args.rounds} rounds × {args.local_steps} steps, batch "
                 f"{args.batch_size}; seeds {seeds}", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out / "federated_study.png", dpi=120)
    print(f"wrote {args.out / 'federated_study.json'} and {args.out / 'federated_study.png'}; wall {wall:.0f} s")


if __name__ == "__main__":
    main()
