"""Issue 15: CPU step time of rev before (inversion code, segment_size=1) and after (segment replay), same run.

Two source trees that differ only in dpmemarc_core/methods/{reversible,rev_coupling}.py:
  OLD = the repo at the commit before the replay (git archive <commit> | tar -x -C OLD)
  NEW = the same plus this issue's rev files.
Each variant is one `benchmarks/method_speed.py --one ROW` subprocess (GPT-2 small config, B=8, T=128, one
thread, 1 warm-up + median of 3 steps, dropout on, DP sigma=1 C=1, BK mixed), rounds in alternating order.

    python rev_speed.py OLD NEW ROUNDS OUT.json
"""
import json
import os
import statistics
import subprocess
import sys
import time

old, new, rounds, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
TAG = "STEP_SPEED_RESULT "
variants = {"nondp-lora": (new, "nondp-lora"), "dp-rev old (inversion code, k=1)": (old, "dp-rev"),
            "dp-rev new (replay, k=ceil(sqrt(L)))": (new, "dp-rev")}
flags = ["--model", "gpt2", "--threads", "1", "--warmup", "1", "--steps", "3", "--batch-size", "8", "--seq-len", "128"]
runs = {v: [] for v in variants}
names = list(variants)
for r in range(rounds):
    for name in names if r % 2 == 0 else names[::-1]:
        tree, row = variants[name]
        env = {**os.environ, "PYTHONPATH": tree, "OMP_NUM_THREADS": "1"}
        t = time.time()
        proc = subprocess.run([sys.executable, f"{tree}/benchmarks/method_speed.py", "--one", row, *flags],
                              capture_output=True, text=True, env=env, cwd=tree)
        line = next((l for l in proc.stdout.splitlines() if l.startswith(TAG)), None)
        if line is None:
            print(name, "FAILED", proc.stderr[-2000:], flush=True)
            continue
        res = json.loads(line[len(TAG):])
        runs[name].append(res)
        print(f"round {r+1} {name}: CPU {res['median_cpu_s']:.2f}s wall {res['median_s']:.2f}s "
              f"load {res['load_avg'][0]:.1f} ({time.time()-t:.0f}s)", flush=True)
summary = {}
base = statistics.median(x["median_cpu_s"] for x in runs["nondp-lora"])
for name, rs in runs.items():
    if rs:
        cpu = statistics.median(x["median_cpu_s"] for x in rs)
        summary[name] = {"median_cpu_s": cpu, "x_nondp_lora": cpu / base, "cpu_s_per_round": [x["median_cpu_s"] for x in rs],
                         "wall_s_per_round": [x["median_s"] for x in rs]}
o, n = summary["dp-rev old (inversion code, k=1)"]["median_cpu_s"], summary["dp-rev new (replay, k=ceil(sqrt(L)))"]["median_cpu_s"]
summary["new_over_old_2pass"] = n / o
if "dp-rev-1pass old" in summary and "dp-rev-1pass new" in summary:
    summary["new_over_old_1pass"] = summary["dp-rev-1pass new"]["median_cpu_s"] / summary["dp-rev-1pass old"]["median_cpu_s"]
json.dump({"command": " ".join(sys.argv), "flags": flags, "machine_load_at_end": os.getloadavg(),
           "summary": summary, "runs": runs}, open(out, "w"), indent=1)
print(json.dumps(summary, indent=1))
