"""Figure 3: BLEU against training steps for DP-LoRA, MemDPT_side and MemDPT_rev at ε=8.

    python -m simulations.figure3 --scale offline     # SmolLM2-135M on SNLI premise -> hypothesis, CPU
    python -m simulations.figure3 --quick
    python -m simulations.figure3 --scale paper       # GPT-2-large on E2E, 40K steps (hub, GPU)

One run per method; the noise is calibrated for all `max_steps`, and `PrivateTrainer.run`'s on_step callback
evaluates BLEU (and ROUGE-L, perplexity) every `eval_every` steps. A method's curve is one cell: an
interrupted curve is run again from step 0.
"""

from __future__ import annotations

import time
from pathlib import Path

from simulations import paper_numbers
from simulations.common import (
    CellStore,
    Footnotes,
    load_config,
    markdown_table,
    parse_args,
    require_hub,
    run_cells,
    run_name,
    scale_note,
    selection,
    train_config,
    train_settings,
    write_outputs,
)

NAME = "figure3"
EPSILON = 8.0


def curve_cell(config: dict, task_name: str, method: str) -> dict:
    """Train one method for max_steps, evaluating at step 0 and every eval_every steps."""
    from dpmemarc_core.data import load_task, task_kind_of
    from dpmemarc_core.metrics import evaluate_generation
    from dpmemarc_core.privacy import PrivacySettings, noise_multiplier_for
    from dpmemarc_core.training.build import build_run, make_trainer
    from dpmemarc_core.training.config import sample_rate_for
    from dpmemarc_core.training.precision import autocast_context

    cfg = train_config(config, task_name, method, EPSILON)
    steps, every = config["max_steps"], config["eval_every"]
    if not (isinstance(every, int) and 1 <= every <= steps):
        raise ValueError(f"eval_every must be an integer in [1, max_steps={steps}], got {every!r}")
    if task_kind_of(task_name) != "generation":
        raise ValueError(f"figure3 needs a generation task, got {task_name!r} ({task_kind_of(task_name)})")
    privacy = PrivacySettings(target_epsilon=cfg.epsilon, delta=cfg.delta, max_grad_norm=cfg.max_grad_norm)
    run = build_run(cfg.model, "generation", method, method_options=cfg.method_options, zo_params=cfg.zo_params,
                    precision=cfg.precision, device=cfg.device, seed=cfg.seed)
    model, tokenizer = run.model, run.tokenizer
    task = load_task(task_name, tokenizer, max_length=cfg.max_length, max_train=cfg.max_train,
                     max_eval=cfg.max_eval, seed=cfg.seed)
    n = len(task.train)
    delta = privacy.resolved_delta(n)
    q = sample_rate_for(cfg.batch_size, n)
    sigma = noise_multiplier_for(target_epsilon=privacy.target_epsilon, delta=delta, sample_rate=q, steps=steps,
                                 accountant=privacy.accountant)
    trainer = make_trainer(method, model, task.train, task.collate, privacy, q, sigma, lr=cfg.lr,
                           physical_batch_size=cfg.physical_batch_size, device=run.device, precision=run.precision)
    curve = []
    start = time.perf_counter()

    def checkpoint(step: int) -> None:
        if step % every and step != steps:
            return
        with autocast_context(run.precision, run.device.type):
            metrics = evaluate_generation(model, tokenizer, task)
        curve.append({"step": step, **metrics, "elapsed_seconds": time.perf_counter() - start})
        print(f"  {method} step {step}/{steps}: BLEU {metrics['bleu']:.2f} ROUGE-L {metrics['rouge_l']:.2f} "
              f"PPL {metrics['perplexity']:.2f}", flush=True)

    checkpoint(0)
    stats = trainer.run(steps, progress=False, on_step=checkpoint)
    return {"curve": curve, "noise_multiplier": sigma, "delta": delta, "sample_rate": q, "steps": steps,
            "train_examples": n, "eval_examples": len(task.eval), "epsilon": trainer.accountant.get_epsilon(delta),
            "non_private_diagnostics": stats}


CURVE_METRICS = (("bleu", "BLEU"), ("rouge_l", "ROUGE-L"), ("perplexity", "perplexity"))


def render(config: dict, cells: dict) -> str:
    notes = Footnotes()
    steps = sorted({p["step"] for c in cells.values() if c.get("status") == "done" for p in c["curve"]})
    header = ["Method"] + [f"step {s}" for s in steps]

    def rows(metric: str) -> list[list[str]]:
        out = []
        for method in config["methods"]:
            cell = cells.get(method)
            label = paper_numbers.METHOD_LABELS.get(method, method)
            if cell is None:
                out.append([label] + ["…"] * len(steps))
            elif cell.get("status") != "done":
                out.append([label] + [notes.mark(cell.get("error", "failed").splitlines()[0][:300])] * len(steps))
            else:
                values = {p["step"]: p[metric] for p in cell["curve"]}
                out.append([label] + [f"{values[s]:.2f}" if s in values else "—" for s in steps])
        return out

    parts = [
        f"## Figure 3: BLEU against training steps ({config['model']} on {config['tasks'][0]}, ε=8)",
        "",
        scale_note(config),
        f"Paper: {paper_numbers.FIGURE3_TEXT}",
    ]
    for metric, title in CURVE_METRICS:  # the figure plots BLEU; ROUGE-L and perplexity at the same checkpoints
        parts += ["", f"{title}:", "", markdown_table(header, rows(metric))]
    parts += ["", f"![figure 3]({NAME}.png)"]
    if notes.notes:
        parts += ["", notes.render()]
    return "\n".join(parts) + "\n"


def plot(config: dict, cells: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4))
    missing = []
    for method in config["methods"]:
        cell = cells.get(method)
        label = paper_numbers.METHOD_LABELS.get(method, method)
        if not cell or cell.get("status") != "done":
            missing.append(label)
            continue
        axis.plot([p["step"] for p in cell["curve"]], [p["bleu"] for p in cell["curve"]], marker="o", label=label)
    axis.set_xlabel("training step")
    axis.set_ylabel("BLEU")
    title = f"{config['model']} on {config['tasks'][0]}, ε = 8"
    if missing:
        title += f"\n(no curve: {', '.join(missing)})"
    axis.set_title(title, fontsize=10)
    if len(missing) < len(config["methods"]):
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    print(f"wrote {path}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(NAME, __doc__.splitlines()[0], argv)
    config = load_config(args.config, args.scale, args.quick)
    for key in ("max_steps", "eval_every"):
        if key not in config:
            raise SystemExit(f"{args.config}: figure3 needs '{key}'")
    if len(config["tasks"]) != 1:
        raise SystemExit(f"{args.config}: figure3 takes exactly one generation task, got {config['tasks']}")
    if args.scale == "paper":
        require_hub(config)
    out = Path(args.results) / NAME / run_name(args)
    print(f"{NAME}: {scale_note(config)}\nresults in {out}", flush=True)
    task = config["tasks"][0]
    jobs = [(method, {"task": task, "method": method, "epsilon_target": "8", "eval_every": config["eval_every"],
                      "settings": train_settings(config, task, method, EPSILON)},
             lambda m=method: curve_cell(config, task, m)) for method in config["methods"]]
    cells = run_cells(CellStore(out / "cells"), jobs, selection(args))
    write_outputs(out, NAME, {"config": config, "curves": cells}, render(config, cells))
    plot(config, cells, out / f"{NAME}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
