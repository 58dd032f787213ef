"""Table 3: generation quality (BLEU, ROUGE-L, perplexity) and training memory under DP, ε ∈ {1.6, 8, ∞}.

    python -m simulations.table3 --scale offline      # SmolLM2-135M, SNLI premise -> entailed hypothesis, CPU
    python -m simulations.table3 --quick              # a smoke run of the same wiring
    python -m simulations.table3 --scale paper        # GPT-2-large on E2E (hub, GPU)

Memory columns simulate the paper's exact setting (GPT-2-large, B=32, T=128, bf16) at every scale.
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

NAME = "table3"
PAPER_ROWS = ("full", "lora", "adapter", "bitfit", "prompt", "side", "rev")
METRICS = (("bleu", "BLEU", ".1f"), ("rouge_l", "ROUGE-L", ".1f"), ("perplexity", "PPL", ".2f"))
CLAIM_EPSILON = 8.0


def render(config: dict, train_cells: dict, memory_cells: dict) -> str:
    notes = Footnotes()
    epsilons = config["epsilons"]
    (task,) = config["tasks"]
    paper_task = task if config["scale"] == "paper" else config.get("paper_columns", {}).get(task)
    header = ["Method"] + [f"Memory GiB {epsilon_label(e)}" for e in epsilons]
    header += [f"{label} {epsilon_label(e)}" for _, label, _ in METRICS for e in epsilons]
    header.append("Trainable % (paper model)")
    methods = list(PAPER_ROWS) + [m for m in config["methods"] if m not in PAPER_ROWS]
    rows = []
    for method in methods:
        ran = method in config["methods"]
        paper = paper_numbers.TABLE3.get(method) if paper_task else None
        label = paper_numbers.METHOD_LABELS.get(method, method) + ("" if ran else " (not in dpmemarc: paper only)")
        row = [label]
        for e in epsilons:
            ours = (cell_value(memory_cells.get(memory_cell_id(memory_spec(config, method, e))),
                               lambda c: c["peak_gib"], ".2f", notes) if ran else "—")
            row.append(with_paper(ours, paper and paper["memory_gb"].get(epsilon_key(e)), ".2f"))
        for metric, _, fmt in METRICS:
            for e in epsilons:
                ours = (cell_value(train_cells.get(f"{task}__{method}__eps{epsilon_key(e)}"),
                                   lambda c, m=metric: c["metrics"][m], fmt, notes) if ran else "—")
                row.append(with_paper(ours, paper and paper[metric].get(epsilon_key(e)), fmt))
        share = "—"
        if ran:
            share = cell_value(memory_cells.get(memory_cell_id(memory_spec(config, method, CLAIM_EPSILON))),
                               lambda c: 100.0 * c["trainable_parameters"] / c["total_parameters"], ".2f", notes)
        row.append(with_paper(share, paper and paper["trainable_percent"], ".2f"))
        rows.append(row)
    before = next((c for c in train_cells.values() if c.get("status") == "done"), None)
    baseline = ""
    if before is not None:
        m = before["metrics_before"]
        baseline = (f"Before fine-tuning ({config['model']}, same evaluation): BLEU {m['bleu']:.1f}, "
                    f"ROUGE-L {m['rouge_l']:.1f}, PPL {m['perplexity']:.2f}.")
    parts = [
        f"## Table 3: generation ({config['model']} on {task}), BLEU / ROUGE-L / perplexity and training memory",
        "",
        scale_note(config),
        "Each cell: ours (paper). BLEU and ROUGE-L on 0-100, greedy decoding against every reference of a "
        "source; perplexity of the reference targets. Memory: one simulated training step of "
        f"{config['memory']['model']} at B={config['memory'].get('batch_size', 32)}, "
        f"T={config['memory'].get('seq_len', 128)}, {config['memory'].get('precision', 'bf16')} on the meta device "
        "(BK engine; ε=∞ without clipping or noise), peak GiB; simulated figures read 5-15 % low. '…' = not run yet.",
        "",
        markdown_table(header, rows),
        "",
        baseline,
    ]
    if notes.notes:
        parts += ["", notes.render()]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(NAME, __doc__.splitlines()[0], argv)
    config = load_config(args.config, args.scale, args.quick)
    if len(config["tasks"]) != 1:
        raise SystemExit(f"{args.config}: table3 takes exactly one generation task, got {config['tasks']}")
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
