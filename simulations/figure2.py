"""Figure 2: MemDPT_rev with different sub-functions F (LoRA, parallel adapter, prefix tuning, DyLoRA) at ε=8.

    python -m simulations.figure2 --scale offline     # MiniLM on movie snippets, CPU
    python -m simulations.figure2 --quick
    python -m simulations.figure2 --scale paper       # RoBERTa-large on SST-2 (hub, GPU)

Bars: accuracy after training and simulated training memory of the paper's model, one pair per variant.
"""

from __future__ import annotations

from pathlib import Path

from simulations import paper_numbers
from simulations.common import (
    CellStore,
    Footnotes,
    cell_value,
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
    train_cell,
    train_settings,
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


def render(config: dict, train_cells: dict, memory_cells: dict) -> str:
    notes = Footnotes()
    (task,) = config["tasks"]
    rows = []
    for name, variant in variants_of(config).items():
        accuracy = cell_value(train_cells.get(name), lambda c: 100.0 * c["metrics"]["accuracy"], ".2f", notes)
        memory = cell_value(memory_cells.get(memory_cell_id(variant_memory_spec(config, variant["options"]))),
                            lambda c: c["peak_gib"], ".2f", notes)
        rows.append([variant["label"], accuracy, memory])
    parts = [
        f"## Figure 2: MemDPT_rev with different F sub-functions ({config['model']} on {task}, ε=8)",
        "",
        scale_note(config),
        f"Memory: simulated peak GiB of {config['memory']['model']} at B={config['memory'].get('batch_size', 32)}, "
        f"T={config['memory'].get('seq_len', 128)}, {config['memory'].get('precision', 'bf16')} (reads 5-15 % low).",
        f"Paper: {paper_numbers.FIGURE2_TEXT}",
        "",
        markdown_table(["F", "Accuracy %", "Memory GiB"], rows),
        "",
        f"![figure 2]({NAME}.png)",
    ]
    if notes.notes:
        parts += ["", notes.render()]
    return "\n".join(parts) + "\n"


def plot(config: dict, train_cells: dict, memory_cells: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = variants_of(config)
    labels = [v["label"] for v in variants.values()]

    def values(read) -> list[float | None]:
        out = []
        for cell in read:
            out.append(cell[1](cell[0]) if cell[0] and cell[0].get("status") == "done" else None)
        return out

    accuracy = values([(train_cells.get(n), lambda c: 100.0 * c["metrics"]["accuracy"]) for n in variants])
    memory = values([(memory_cells.get(memory_cell_id(variant_memory_spec(config, v["options"]))),
                      lambda c: c["peak_gib"]) for v in variants.values()])
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, data, title in ((axes[0], accuracy, f"accuracy % ({config['model']}, {config['tasks'][0]})"),
                              (axes[1], memory, f"simulated training memory GiB ({config['memory']['model']})")):
        positions = range(len(labels))
        axis.bar(positions, [d or 0.0 for d in data], color=["tab:blue" if d is not None else "lightgray" for d in data])
        for x, d in zip(positions, data):
            axis.text(x, d or 0.0, f"{d:.2f}" if d is not None else "n/a", ha="center", va="bottom", fontsize=9)
        axis.set_xticks(list(positions), labels, rotation=15)
        axis.set_title(title, fontsize=10)
    figure.suptitle("MemDPT_rev: sub-function F at ε = 8 (n/a: variant not available)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    print(f"wrote {path}", flush=True)


def main(argv: list[str] | None = None) -> int:
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
    jobs = [(name, {"task": task, "variant": variant["label"],
                    "settings": train_settings(config, task, "rev", EPSILON,
                                              method_options=variant_train_options(config, variant["options"]))},
             lambda o=variant_train_options(config, variant["options"]): train_cell(config, task, "rev", EPSILON,
                                                                                  method_options=o))
            for name, variant in variants.items()]
    train_cells = run_cells(CellStore(out / "cells"), jobs, selection(args))
    write_outputs(out, NAME, {"config": config, "train": train_cells, "memory": memory_cells},
                  render(config, train_cells, memory_cells))
    plot(config, train_cells, memory_cells, out / f"{NAME}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
