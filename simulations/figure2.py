"""Figure 2: MemDPT_rev with different sub-functions F (LoRA, parallel adapter, prefix tuning, DyLoRA) at ε=8.

    python -m simulations.figure2 --scale offline     # MiniLM on movie snippets, CPU
    python -m simulations.figure2 --quick
    python -m simulations.figure2 --scale paper       # RoBERTa-large on SST-2 (hub, GPU)

Bars: accuracy after training (mean ± sd over the config's seeds, each seed a dot) and simulated training
memory of the paper's model, one pair per variant.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

from simulations import paper_numbers
from simulations.common import (
    PAIRED_INTERVAL,
    PRIOR_Z,
    CellStore,
    Footnotes,
    Job,
    cell_value,
    class_prior,
    difference_text,
    evaluation_note,
    load_config,
    markdown_table,
    memory_cell_id,
    memory_jobs,
    memory_selection,
    memory_spec,
    memory_store,
    no_change,
    no_change_note,
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
    sign_verdict,
    summarize,
    timing,
    timing_line,
    train_cell,
    train_settings,
    unlearned,
    with_seed,
    write_outputs,
)

NAME = "figure2"
EPSILON = 8.0


def variants_of(config: dict) -> dict[str, dict]:
    variants = config.get("variants")
    if not variants or any("label" not in v or "options" not in v for v in variants.values()):
        raise ValueError(f"{config['config_path']}: needs [variants.<name>] sections with 'label' and 'options'")
    return variants


def variant_train_options(config: dict, options: dict) -> dict:
    """A variant's rev options for training: the scale's [<scale>.method_options] rev entry overrides them."""
    return {**options, **config.get("method_options", {}).get("rev", {})}


def variant_memory_spec(config: dict, options: dict) -> dict:
    return {**memory_spec(config, "rev", EPSILON), "method_options": dict(options)}


def summarize_cells(config: dict, train_cells: dict) -> dict:
    """Per variant: accuracy over the seeds, each seed's evaluation size, and whether it sits at the class prior."""
    out = {}
    for name in variants_of(config):
        cells = seed_cells(train_cells, name, config)
        out[name] = {"accuracy": summarize(cells, lambda c: 100.0 * c["metrics"]["accuracy"]),
                     "eval_examples": summarize(cells, lambda c: c.get("eval_examples"))["values"],
                     "class_prior": class_prior(cells),
                     "no_change": no_change(cells)}
    return out


def render(config: dict, train_cells: dict, memory_cells: dict, summary: dict) -> str:
    notes = Footnotes()
    (task,) = config["tasks"]
    rows = []
    for name, variant in variants_of(config).items():
        label = unlearned(summary[name])
        if label == "class prior":
            accuracy = label + notes.ref(
                f"accuracy within {PRIOR_Z:g} binomial standard errors of the majority-class share of the evaluation "
                f"examples ({100 * summary[name]['class_prior']['majority_share']:.1f} %): the label frequencies, "
                "not the task, were learned")
        elif label == "no change":
            accuracy = label + notes.ref(no_change_note(summary[name]["no_change"]))
        else:
            accuracy = seed_text(seed_cells(train_cells, name, config), summary[name]["accuracy"], ".1f", notes)
        memory = cell_value(memory_cells.get(memory_cell_id(variant_memory_spec(config, variant["options"]))),
                            lambda c: c["peak_gib"], ".2f", notes)
        rows.append([variant["label"], accuracy, memory])
    parts = [
        f"## Figure 2: MemDPT_rev with different F sub-functions ({config['model']} on {task}, ε=8)",
        "",
        scale_note(config),
        seeds_note(config),
        evaluation_note(train_cells.values()),
        (f"Memory: simulated peak GiB of {config['memory']['model']} at B={config['memory'].get('batch_size', 32)}, "
         f"T={config['memory'].get('seq_len', 128)}, {config['memory'].get('precision', 'bf16')} (reads 5-15 % low; "
         "deterministic, no seeds)."),
        f"Paper: {paper_numbers.FIGURE2_TEXT}",
        "",
        markdown_table(["F", "Accuracy %", "Memory GiB"], rows),
        "",
        claim_check(config, summary),
        "",
        f"![figure 2]({NAME}.png)",
    ]
    if notes.notes:
        parts += ["", notes.render()]
    return "\n".join(parts) + "\n"


def claim_check(config: dict, summary: dict) -> str:
    """The paper's reading (F = LoRA best), as LoRA minus each other F with its 95 % paired interval over seeds."""
    variants = variants_of(config)
    lines = ["Claim check (the paper: F = LoRA is best): the mean over seeds of LoRA's accuracy minus each other "
             f"F's, with its {PAIRED_INTERVAL}."]
    if "lora" not in variants or summary["lora"]["accuracy"]["n"] == 0:
        return "\n".join(lines + ["- LoRA has not finished"])
    lora = summary["lora"]["accuracy"]["values"]
    for name, variant in variants.items():
        values = summary[name]["accuracy"]["values"]
        if name == "lora" or not values:
            continue
        gap, interval = difference_text(lora, values)
        verdict = sign_verdict(interval, "LoRA higher", f"{variant['label']} higher")
        lines.append(f"- LoRA − {variant['label']}: {gap}: {verdict}")
    return "\n".join(lines)


def plot(config: dict, summary: dict, memory_cells: dict, path: Path) -> None:
    """Bars of mean accuracy with ± sd error bars and each seed's value as a dot; memory bars beside them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = variants_of(config)
    labels = [v["label"] for v in variants.values()]
    accuracy = [summary[name]["accuracy"] for name in variants]
    memory = []
    for variant in variants.values():
        cell = memory_cells.get(memory_cell_id(variant_memory_spec(config, variant["options"])))
        memory.append(cell["peak_gib"] if cell and cell.get("status") == "done" else None)
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    positions = list(range(len(labels)))
    means = [a["mean"] for a in accuracy]
    priors = [summary[name]["class_prior"] for name in variants]
    no_result = [unlearned(summary[name]) is not None for name in variants]
    axes[0].bar(positions, [m or 0.0 for m in means], yerr=[a["sd"] or 0.0 for a in accuracy], capsize=4,
                color=["tab:blue" if m is not None and not gray else "lightgray" for m, gray in zip(means, no_result)])
    shares = [100 * p["majority_share"] for p in priors if p is not None]
    if shares:
        axes[0].axhline(sum(shares) / len(shares), color="tab:red", linestyle="--", linewidth=1,
                        label="majority-class share (gray bars: within its sampling noise, or unchanged by training)")
        axes[0].legend(fontsize=8, loc="lower right")
    for x, a in zip(positions, accuracy):
        axes[0].scatter([x] * a["n"], list(a["values"].values()), color="black", s=10, zorder=3)
        text = "n/a" if a["mean"] is None else f"{a['mean']:.1f}" + (f" ± {a['sd']:.1f}" if a["sd"] is not None else "")
        axes[0].text(x, (a["mean"] or 0.0) + (a["sd"] or 0.0), text, ha="center", va="bottom", fontsize=9)
    axes[1].bar(positions, [m or 0.0 for m in memory],
                color=["tab:blue" if m is not None else "lightgray" for m in memory])
    for x, m in zip(positions, memory):
        axes[1].text(x, m or 0.0, f"{m:.2f}" if m is not None else "n/a", ha="center", va="bottom", fontsize=9)
    axes[0].set_title(f"accuracy % ({config['model']}, {config['tasks'][0]}), mean ± sd over seeds", fontsize=10)
    axes[1].set_title(f"simulated training memory GiB ({config['memory']['model']})", fontsize=10)
    for axis in axes:
        axis.set_xticks(positions, labels, rotation=15)
    figure.suptitle("MemDPT_rev: sub-function F at ε = 8 (dots: seeds; n/a: variant not available)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    print(f"wrote {path}", flush=True)


def main(argv: list[str] | None = None) -> int:
    started, started_at = time.perf_counter(), time.time()
    args = parse_args(NAME, __doc__.splitlines()[0], argv)
    config = load_config(args.config, args.scale, args.quick)
    if len(config["tasks"]) != 1:
        raise SystemExit(f"{args.config}: figure2 takes exactly one classification task, got {config['tasks']}")
    if args.scale == "paper":
        require_hub(config)
    out = Path(args.results) / NAME / run_name(args)
    print(f"{NAME}: {scale_note(config)}\nresults in {out}", flush=True)
    variants = variants_of(config)
    memory_cells = run_cells(memory_store(Path(args.results)),
                             memory_jobs(variant_memory_spec(config, v["options"]) for v in variants.values()),
                             memory_selection(args))
    task = config["tasks"][0]
    jobs = []
    for name, variant in variants.items():
        options = variant_train_options(config, variant["options"])
        for seed in config["seeds"]:
            seeded = with_seed(config, seed)
            fields = {"task": task, "variant": variant["label"],
                      "settings": train_settings(seeded, task, "rev", EPSILON, method_options=options)}
            jobs.append(Job(seeded_id(name, seed), fields,
                            partial(train_cell, seeded, task, "rev", EPSILON, method_options=options), legacy_id=name))
    train_cells = run_cells(CellStore(out / "cells"), jobs, selection(args), args.jobs)
    summary = summarize_cells(config, train_cells)
    record = timing(started, started_at, args.jobs, train_cells.values())
    write_outputs(out, NAME, {"config": config, "summary": summary, "train": train_cells, "memory": memory_cells,
                              "timing": record},
                  render(config, train_cells, memory_cells, summary))
    plot(config, summary, memory_cells, out / f"{NAME}.png")
    print(timing_line(NAME, record), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
