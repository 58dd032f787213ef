"""How long `dpmemarc plan` takes to answer for GPT-2-large: cold (empty simulation cache) and warm (the same
question again, and another budget whose searches reuse the cached simulations).

    python benchmarks/plan_speed.py          # writes benchmarks/results/plan_speed.json

Each run is the real command in a fresh interpreter (imports included), with its own $DPMEMARC_CACHE.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "plan_speed.json"
RUNS = (  # (name, arguments after `dpmemarc plan`); in this order, sharing one cache
    ("cold, one method", ["--model", "gpt2-large", "--memory", "8GiB", "--method", "side"]),
    ("cold, all methods", ["--model", "gpt2-large", "--memory", "8GiB"]),
    ("warm, same question", ["--model", "gpt2-large", "--memory", "8GiB"]),
    ("warm, one method", ["--model", "gpt2-large", "--memory", "8GiB", "--method", "side"]),
    ("partly warm, another budget", ["--model", "gpt2-large", "--memory", "12GiB"]),
)


def main() -> int:
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "DPMEMARC_CACHE": cache}
        for name, args in RUNS:
            command = [sys.executable, "-m", "dpmemarc_core.cli", "plan", *args, "--json"]
            start = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, check=True)
            seconds = time.perf_counter() - start
            best = json.loads(done.stdout)["options"][0]
            rows.append({"run": name, "command": "dpmemarc plan " + " ".join(args), "seconds": round(seconds, 1),
                         "best": best})
            print(f"{name:30s} {seconds:6.1f} s  best: {best['method']} at {best['physical_batch_size']}", flush=True)
    RESULTS.write_text(json.dumps({"cpu_count": os.cpu_count(), "runs": rows}, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
