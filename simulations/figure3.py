"""Figure 3: BLEU against training steps for DP-LoRA, MemDPT_side and MemDPT_rev at ε=8.

    python -m simulations.figure3 --scale offline     # SmolLM2-135M on SNLI premise -> hypothesis, CPU
    python -m simulations.figure3 --quick
    python -m simulations.figure3 --scale paper       # GPT-2-large on E2E, 40K steps (hub, GPU)

One run per method and seed; the noise is calibrated for all `max_steps`, and `PrivateTrainer.run`'s on_step
callback evaluates BLEU (and ROUGE-L, perplexity) every `eval_every` steps. A (method, seed) curve is one cell:
an interrupted curve is run again from step 0. Each checkpoint shows the mean ± sd over the seeds.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

from simulations import paper_numbers
from simulations.common import (
    CellStore,
    Footnotes,
    Job,
    evaluation_note,
    load_config,
    markdown_table,
    parse_args,
    require_hub,
    run_cells,
    run_name,
    scale_note,
    seed_cells,
    seed_text,
    seeded_id,
    seeds_note,
    selection,
    summarize,
    timing,
    timing_line,
    train_config,
    train_settings,
    with_seed,
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


def summarize_curves(config: dict, cells: dict) -> dict:
    """Per method: at each checkpoint step, each metric over the seeds whose curve reached that step."""
    out = {}
    for method in config["methods"]:
        runs = seed_cells(cells, method, config)
        steps = sorted({p["step"] for c in runs if c is not None and c.get("status") == "done" for p in c["curve"]})
        out[method] = {"eval_examples": summarize(runs, lambda c: c.get("eval_examples"))["values"], "curve": [
            {"step": step, **{metric: summarize(runs, lambda c, s=step, m=metric: next(
                (p[m] for p in c["curve"] if p["step"] == s), None)) for metric, _ in CURVE_METRICS}}
            for step in steps]}
    return out


def render(config: dict, cells: dict, summary: dict) -> str:
    notes = Footnotes()
    steps = sorted({p["step"] for s in summary.values() for p in s["curve"]})
    header = ["Method"] + [f"step {s}" for s in steps]

    def rows(metric: str) -> list[list[str]]:
        out = []
        for method in config["methods"]:
            runs = seed_cells(cells, method, config)
            at = {p["step"]: p[metric] for p in summary[method]["curve"]}
            label = paper_numbers.METHOD_LABELS.get(method, method)
            out.append([label] + [seed_text(runs, at.get(s, {"n": 0}), ".2f", notes) for s in steps])
        return out

    parts = [
        f"## Figure 3: BLEU against training steps ({config['model']} on {config['tasks'][0]}, ε=8)",
        "",
        scale_note(config),
        seeds_note(config),
        evaluation_note(cells.values()),
        f"Paper: {paper_numbers.FIGURE3_TEXT}",
    ]
    for metric, title in CURVE_METRICS:  # the figure plots BLEU; ROUGE-L and perplexity at the same checkpoints
        parts += ["", f"{title}:", "", markdown_table(header, rows(metric))]
    parts += ["", f"![figure 3]({NAME}.png)"]
    if notes.notes:
        parts += ["", notes.render()]
    return "\n".join(parts) + "\n"


def plot(config: dict, summary: dict, path: Path) -> None:
    """Mean BLEU over seeds at each checkpoint, ± sd error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4))
    missing = []
    for method in config["methods"]:
        curve = summary[method]["curve"]
        label = paper_numbers.METHOD_LABELS.get(method, method)
        if not curve:
            missing.append(label)
            continue
        seeds = max(p["bleu"]["n"] for p in curve)
        axis.errorbar([p["step"] for p in curve], [p["bleu"]["mean"] for p in curve],
                      yerr=[p["bleu"]["sd"] or 0.0 for p in curve], marker="o", capsize=3,
                      label=f"{label} (n={seeds})")
    axis.set_xlabel("training step")
    axis.set_ylabel("BLEU (mean ± sd over seeds)")
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
    started, started_at = time.perf_counter(), time.time()
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
    jobs = []
    for method in config["methods"]:
        for seed in config["seeds"]:
            seeded = with_seed(config, seed)
            fields = {"task": task, "method": method, "epsilon_target": "8", "eval_every": config["eval_every"],
                      "settings": train_settings(seeded, task, method, EPSILON)}
            jobs.append(Job(seeded_id(method, seed), fields, partial(curve_cell, seeded, task, method),
                            legacy_id=method))
    cells = run_cells(CellStore(out / "cells"), jobs, selection(args), args.jobs)
    summary = summarize_curves(config, cells)
    record = timing(started, started_at, args.jobs, cells.values())
    write_outputs(out, NAME, {"config": config, "summary": summary, "curves": cells, "timing": record},
                  render(config, cells, summary))
    plot(config, summary, out / f"{NAME}.png")
    print(timing_line(NAME, record), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
