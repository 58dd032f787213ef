"""Table 2: text classification accuracy and training memory under DP, ε ∈ {1.6, 8, ∞}.

    python -m simulations.table2 --scale offline      # MiniLM on SNLI / Rotten Tomatoes / movie snippets, CPU
    python -m simulations.table2 --quick              # a smoke run of the same wiring
    python -m simulations.table2 --scale paper        # RoBERTa-large on MNLI / QQP / QNLI / SST-2 (hub, GPU)

Memory columns simulate the paper's exact setting (RoBERTa-large, B=32, T=128, bf16) at every scale.
"""

from __future__ import annotations

from pathlib import Path

from simulations import paper_numbers
from simulations.common import (
    CellStore,
    Footnotes,
    cell_value,
    epsilon_key,
    epsilon_label,
    load_config,
    markdown_table,
    memory_cell_id,
    memory_jobs,
    memory_selection,
    memory_spec,
    memory_store,
    parse_args,
    require_hub,
    run_cells,
    run_name,
    scale_note,
    selection,
    training_jobs,
    with_paper,
    write_outputs,
)

NAME = "table2"
PAPER_ROWS = ("full", "lora", "adapter", "bitfit", "prompt", "side", "rev")
CLAIM_EPSILON = 8.0
CLAIM_POINTS = 2.0


def paper_column(config: dict, task: str) -> str | None:
    if config["scale"] == "paper":
        return task if task in paper_numbers.TABLE2["lora"] else None
    return config.get("paper_columns", {}).get(task)


def rows_in_order(config: dict) -> list[str]:
    return list(PAPER_ROWS) + [m for m in config["methods"] if m not in PAPER_ROWS]


def accuracy_percent(cell: dict) -> float:
    return 100.0 * cell["metrics"]["accuracy"]


def render(config: dict, train_cells: dict, memory_cells: dict) -> str:
    notes = Footnotes()
    epsilons = config["epsilons"]
    header = ["Method"] + [f"Memory GiB {epsilon_label(e)}" for e in epsilons]
    for task in config["tasks"]:
        paper = paper_column(config, task)
        name = task if config["scale"] == "paper" or paper is None else f"{task} [{paper}]"
        header += [f"{name} {epsilon_label(e)}" for e in epsilons]
    header.append("Trainable % (paper model)")

    rows = []
    for method in rows_in_order(config):
        paper = paper_numbers.TABLE2.get(method)
        label = paper_numbers.METHOD_LABELS.get(method, method)
        if method not in config["methods"]:
            label += " (not in dpmemarc: paper only)"
        row = [label]
        for e in epsilons:
            ours = (cell_value(memory_cells.get(memory_cell_id(memory_spec(config, method, e))),
                               lambda c: c["peak_gib"], ".2f", notes) if method in config["methods"] else "—")
            row.append(with_paper(ours, paper and paper["memory_gb"].get(epsilon_key(e)), ".2f"))
        for task in config["tasks"]:
            column = paper_column(config, task)
            for e in epsilons:
                ours = (cell_value(train_cells.get(f"{task}__{method}__eps{epsilon_key(e)}"), accuracy_percent,
                                   ".2f", notes) if method in config["methods"] else "—")
                row.append(with_paper(ours, paper[column].get(epsilon_key(e)) if paper and column else None, ".2f"))
        share = "—"
        if method in config["methods"]:
            share = cell_value(memory_cells.get(memory_cell_id(memory_spec(config, method, CLAIM_EPSILON))),
                               lambda c: 100.0 * c["trainable_parameters"] / c["total_parameters"], ".2f", notes)
        row.append(with_paper(share, paper and paper["trainable_percent"], ".2f"))
        rows.append(row)

    parts = [
        f"## Table 2: text classification ({config['model']}), accuracy % and training memory",
        "",
        scale_note(config),
        "Each cell: ours (paper). Memory: one simulated training step of "
        f"{config['memory']['model']} at B={config['memory'].get('batch_size', 32)}, "
        f"T={config['memory'].get('seq_len', 128)}, {config['memory'].get('precision', 'bf16')} on the meta device "
        "(BK engine; ε=∞ without clipping or noise), peak GiB; simulated figures read 5-15 % low. The paper "
        "reports mean memory under a profiler, so its figures are higher. '…' = not run yet.",
        "",
        markdown_table(header, rows),
        "",
        claim_check(config, train_cells, memory_cells),
    ]
    if notes.notes:
        parts += ["", notes.render()]
    return "\n".join(parts) + "\n"


def claim_check(config: dict, train_cells: dict, memory_cells: dict) -> str:
    """The paper's claim at ε=8: side and rev within ~2 points of DP-LoRA at several times less memory."""
    if not {"lora", "side", "rev"} <= set(config["methods"]) or CLAIM_EPSILON not in config["epsilons"]:
        return "Claim check: needs lora, side, rev at ε=8."
    key = epsilon_key(CLAIM_EPSILON)

    def peak(method: str) -> float | None:
        cell = memory_cells.get(memory_cell_id(memory_spec(config, method, CLAIM_EPSILON)))
        return cell["peak_gib"] if cell and cell.get("status") == "done" else None

    lines = [f"Claim check (ε=8): side and rev within {CLAIM_POINTS:g} accuracy points of DP-LoRA, with several "
             "times less memory."]
    lora_memory = peak("lora")
    for method in ("side", "rev"):
        if lora_memory and peak(method):
            lines.append(f"- memory: DP-LoRA / {method} = {lora_memory / peak(method):.2f}x "
                         f"(paper: {paper_numbers.TABLE2['lora']['memory_gb']['8'] / paper_numbers.TABLE2[method]['memory_gb']['8']:.2f}x)")
    for task in config["tasks"]:
        cells = {m: train_cells.get(f"{task}__{m}__eps{key}") for m in ("lora", "side", "rev")}
        if not all(c and c.get("status") == "done" for c in cells.values()):
            lines.append(f"- {task}: not all of lora/side/rev finished at ε=8")
            continue
        lora = accuracy_percent(cells["lora"])
        verdicts = []
        for method in ("side", "rev"):
            gap = accuracy_percent(cells[method]) - lora
            verdicts.append(f"{method} {gap:+.2f} points ({'within' if gap >= -CLAIM_POINTS else 'outside'})")
        learned = ", ".join(f"{m} {100 * c['metrics_before']['accuracy']:.1f} → {accuracy_percent(c):.1f}"
                            for m, c in cells.items())
        lines.append(f"- {task}: DP-LoRA {lora:.2f}%; " + "; ".join(verdicts)
                     + f". Before → after training: {learned} (a gap between models that learned nothing says "
                     "nothing about the claim)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(NAME, __doc__.splitlines()[0], argv)
    config = load_config(args.config, args.scale, args.quick)
    if args.scale == "paper":
        require_hub(config)
    out = Path(args.results) / NAME / run_name(args)
    print(f"{NAME}: {scale_note(config)}\nresults in {out}", flush=True)
    memory_cells = run_cells(memory_store(Path(args.results)),
                             memory_jobs(memory_spec(config, m, e) for m in config["methods"]
                                         for e in config["epsilons"]), memory_selection(args))
    train_cells = run_cells(CellStore(out / "cells"), training_jobs(config), selection(args))
    write_outputs(out, NAME, {"config": config, "train": train_cells, "memory": memory_cells},
                  render(config, train_cells, memory_cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
