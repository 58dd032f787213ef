"""Table 4: training memory of MemDPT_side and MemDPT_rev under three DP engines (Opacus, GhostClip, BK).

    python -m simulations.table4          # every scale is the same: simulated on the meta device, no GPU needed

Each cell is one `dpmemarc memory --json` measurement of the paper's exact setting (RoBERTa-large, B=32, T=128,
bf16). At ε=∞ every engine degrades to plain training, as the paper notes, so the three ε=∞ rows are one cell.
"""

from __future__ import annotations

from pathlib import Path

from simulations import paper_numbers
from simulations.common import (
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
    run_cells,
    run_name,
    with_paper,
    write_outputs,
)

NAME = "table4"


def engines_of(config: dict) -> dict[str, dict]:
    engines = config.get("engines")
    if not engines:
        raise ValueError(f"{config['config_path']}: needs [engines.<name>] sections (MemorySpec fields)")
    return engines


def specs(config: dict) -> list[dict]:
    return [memory_spec(config, method, epsilon, engine)
            for engine in engines_of(config).values() for epsilon in config["epsilons"] for method in config["methods"]]


def render(config: dict, cells: dict) -> str:
    notes = Footnotes()
    methods = config["methods"]
    header = ["Engine", "Privacy"] + [f"{paper_numbers.METHOD_LABELS.get(m, m)} GiB" for m in methods]
    rows = []
    for name, engine in engines_of(config).items():
        for epsilon in config["epsilons"]:
            row = [paper_numbers.TABLE4_ENGINE_LABELS.get(name, name), epsilon_label(epsilon)]
            for method in methods:
                cell = cells.get(memory_cell_id(memory_spec(config, method, epsilon, engine)))
                ours = cell_value(cell, lambda c: c["peak_gib"], ".2f", notes)
                paper = paper_numbers.TABLE4.get(name, {}).get(method, {}).get(epsilon_key(epsilon))
                row.append(with_paper(ours, paper, ".2f"))
            rows.append(row)
    memory = config["memory"]
    parts = [
        "## Table 4: training memory of side / rev under three DP engines",
        "",
        f"Each cell: ours (paper), peak GiB of one training step of {memory['model']} at "
        f"B={memory.get('batch_size', 32)}, T={memory.get('seq_len', 128)}, {memory.get('precision', 'bf16')}, "
        "simulated on the meta device (reads 5-15 % low; the paper reports mean memory under a profiler). "
        "ε=∞ is plain training for every engine (one simulation shared by the three rows). "
        "'…' = not run yet.",
        "",
        markdown_table(header, rows),
        "",
        "Opacus on MemDPT_rev runs without error: its hooks record layer inputs in the forward and again when "
        "rev's backward recomputes each block. This table measures memory only; it does not check that "
        "Opacus's per-example gradients through the reversible backward are right.",
    ]
    if notes.notes:
        parts += ["", notes.render()]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(NAME, __doc__.splitlines()[0], argv)
    config = load_config(args.config, args.scale, args.quick)
    out = Path(args.results) / NAME / run_name(args)
    print(f"{NAME}: memory of {', '.join(config['methods'])} under engines {', '.join(engines_of(config))}; "
          f"results in {out}", flush=True)
    cells = run_cells(memory_store(Path(args.results)), memory_jobs(specs(config)), memory_selection(args))
    write_outputs(out, NAME, {"config": config, "memory": cells}, render(config, cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
