"""Time and peak memory of one training step: our BK engine against non-DP, Opacus and fastDP, on GPT-2 small.

Every variant runs in its own Python subprocess, so peak memory figures do not mix and a library that
fails (or patches transformers, as fastDP does) cannot affect the others. A step is the whole thing
a user runs per batch: forward, causal-LM loss, backward (clipped for DP), noise, Adam.

    python benchmarks/step_speed.py                              # CPU, B=8, T=128
    python benchmarks/step_speed.py --device cuda --batch-size 32
    python benchmarks/step_speed.py --variants lora bk-lora      # a subset

fastDP is not a package: give its source tree with --fastdp-src (benchmarks/_fastdp_setup.sh fetches
one). Without it the fastDP rows are reported as failed, with that reason.

Wall time with all of torch's threads (its default) is the headline figure: it is what a user waits for,
and it shows work that does not parallelise (noise drawing, per-layer Python, small reductions). Process
CPU time is the second column; `--threads 1` gives the one-thread view. Both need a quiet machine, and
`--repeats` ≥ 2 (rounds in alternating order): a single measurement moves by ±5 %.

`--paired` measures each DP variant's ratio to its baseline differently, for a machine whose speed drifts
between processes (a shared virtual machine): one subprocess holds both steps and times them in pairs, in
ABBA order, so that drift lands on both alike; the figure is the median of the per-pair ratios.

    python benchmarks/step_speed.py --paired --variants bk-full --repeats 2 --steps 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULT_TAG = "STEP_SPEED_RESULT "
NOISE_MULTIPLIER = 1.0
MAX_GRAD_NORM = 1.0
LR = 1e-4
LORA_RANK = 64

# name → (fine-tuning family, description). The family is also the name of the non-DP baseline of the ratio.
VARIANTS: dict[str, tuple[str, str]] = {
    "lora": ("lora", "non-DP peft LoRA r=64 on c_attn"),
    "full": ("full", "non-DP full fine-tuning"),
    "opacus-lora-hooks": ("lora", "Opacus DP-LoRA, grad_sample_mode=hooks"),
    "opacus-lora-ghost": ("lora", "Opacus DP-LoRA, grad_sample_mode=ghost"),
    "opacus-full-hooks": ("full", "Opacus DP-full, hooks, per-example position_ids"),
    "fastdp-lora": ("lora", "fastDP DP-LoRA (peft model), MixOpt"),
    "fastdp-full": ("full", "fastDP DP-full, MixOpt"),
    "fastdp-full-noswap": ("full", "fastDP DP-full, MixOpt, its GPT-2 forward swap skipped, per-example position_ids"),
    "bk-lora": ("lora", "ours: BK DP-LoRA (peft), mixed"),
    "bk-full": ("full", "ours: BK DP-full, mixed"),
    "bk-full-ghost": ("full", "ours: BK DP-full, ghost"),
    # side and rev exist only here: their step is the dpmemarc trainer's (method_speed.py builds it), and the
    # ratio is to the same trainer without DP.
    "side": ("side", "non-DP side network, reduction 8 (dpmemarc trainer)"),
    "bk-side": ("side", "ours: BK DP side network, reduction 8"),
    "rev": ("rev", "non-DP reversible LoRA r=64 (dpmemarc trainer)"),
    "bk-rev": ("rev", "ours: BK DP reversible, backward passes 'auto' (the default; at r=64 it runs 2)"),
    "bk-rev-1pass": ("rev", "ours: BK DP reversible, 1 backward pass"),
    "rev-r1": ("rev-r1", "non-DP reversible LoRA r=1, adapter bottleneck 1 (the quick preset's size)"),
    "bk-rev-r1": ("rev-r1", "ours: BK DP reversible r=1, backward passes 'auto' (runs 1)"),
}
TRAINER_ROWS = {"side": "nondp-side", "bk-side": "dp-side", "rev": "nondp-rev", "bk-rev": "dp-rev",
                "bk-rev-1pass": "dp-rev-1pass", "rev-r1": "nondp-rev-r1", "bk-rev-r1": "dp-rev-r1"}

Step = Callable[[torch.Tensor], None]


# ---- one variant, inside its subprocess ---------------------------------------------------------------

def build_model(family: str, device: torch.device) -> torch.nn.Module:
    """GPT-2 small from its default config, random weights; LoRA models are wrapped by peft."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config()).to(device)
    if family == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, lora_dropout=0.0, target_modules=["c_attn"],
                            fan_in_fan_out=True, task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
    model.train()
    return model


def lm_loss(model: torch.nn.Module, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    from dpmemarc_core.losses import causal_lm_loss

    return causal_lm_loss(model(input_ids=ids, **kwargs).logits, ids)


def position_ids_for(ids: torch.Tensor) -> torch.Tensor:
    """One row per example: Opacus's per-sample hooks otherwise see one broadcast row for the whole batch."""
    return torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)


def non_dp_step(family: str, device: torch.device, batch_size: int) -> Step:
    model = build_model(family, device)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LR)

    def step(ids: torch.Tensor) -> None:
        lm_loss(model, ids).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def bk_step(family: str, device: torch.device, batch_size: int, clipping_mode: str) -> Step:
    from dpmemarc_core.privacy.engine import BKEngine
    from dpmemarc_core.privacy.noise import privatize_gradients
    from dpmemarc_core.privacy.randomness import PrivateRandomness

    model = build_model(family, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=LR)
    engine = BKEngine(model, max_grad_norm=MAX_GRAD_NORM, clipping_mode=clipping_mode, clip_fn="abadi")
    noise = PrivateRandomness(device)

    def step(ids: torch.Tensor) -> None:
        engine.clipped_backward(lm_loss(model, ids))
        privatize_gradients(params, NOISE_MULTIPLIER, MAX_GRAD_NORM, batch_size, noise)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def opacus_step(family: str, device: torch.device, batch_size: int, mode: str) -> Step:
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    model = build_model(family, device)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LR)
    # make_private needs a loader; fixed-size batches (no Poisson) keep every timed step at B examples.
    loader = DataLoader(TensorDataset(torch.zeros(64 * batch_size, 1)), batch_size=batch_size)
    criterion = torch.nn.CrossEntropyLoss()
    private = PrivacyEngine().make_private(module=model, optimizer=optimizer, data_loader=loader,
                                           noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=MAX_GRAD_NORM,
                                           poisson_sampling=False, grad_sample_mode=mode, criterion=criterion)

    if mode == "ghost":
        model, optimizer, criterion, _ = private

        def step(ids: torch.Tensor) -> None:
            logits = model(input_ids=ids).logits[:, :-1]
            loss = criterion(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), shape=logits.shape[:2])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    model, optimizer, _ = private

    def step(ids: torch.Tensor) -> None:
        # LoRA leaves the position table frozen, so only full fine-tuning needs per-example position ids.
        kwargs = {"position_ids": position_ids_for(ids)} if family == "full" else {}
        lm_loss(model, ids, **kwargs).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def fastdp_step(family: str, device: torch.device, batch_size: int, source: str | None, swap: bool) -> Step:
    if not source:
        raise RuntimeError("fastDP source not given (--fastdp-src or FASTDP_SRC); see benchmarks/_fastdp_setup.sh")
    sys.path.insert(0, source)
    from fastDP import PrivacyEngine, transformers_support

    if not swap:
        # fastDP replaces GPT2Model.forward with a transformers-4 copy (to repeat position ids per example),
        # which fails on transformers 5. Passing per-example position_ids ourselves does the same job.
        transformers_support.forward_swapper = lambda module: None

    model = build_model(family, device)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LR)
    engine = PrivacyEngine(model, batch_size=batch_size, sample_size=64 * batch_size, epochs=1,
                           noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=MAX_GRAD_NORM,
                           clipping_mode="MixOpt", clipping_fn="Abadi", clipping_style="all-layer")
    engine.attach(optimizer)

    def step(ids: torch.Tensor) -> None:
        kwargs = {} if swap or family == "lora" else {"position_ids": position_ids_for(ids)}
        lm_loss(model, ids, **kwargs).mean().backward()
        optimizer.step()  # fastDP's step swaps in the clipped, noised gradient
        optimizer.zero_grad(set_to_none=True)

    return step


def trainer_step(variant: str, device: torch.device, batch_size: int, seq_len: int) -> Step:
    """A dpmemarc trainer's step over its own fixed batch (the same `random_ids` as every other variant)."""
    from method_speed import build_trainer

    from dpmemarc_core.training.loop import StepStats

    trainer, indices = build_trainer(TRAINER_ROWS[variant], "gpt2", batch_size, seq_len, device)
    return lambda ids: trainer.step(indices, StepStats())


def make_step(variant: str, device: torch.device, batch_size: int, seq_len: int, fastdp_src: str | None) -> Step:
    family = VARIANTS[variant][0]
    if variant in TRAINER_ROWS:
        return trainer_step(variant, device, batch_size, seq_len)
    if variant in ("lora", "full"):
        return non_dp_step(family, device, batch_size)
    if variant.startswith("bk-"):
        return bk_step(family, device, batch_size, "ghost" if variant.endswith("-ghost") else "mixed")
    if variant.startswith("opacus-"):
        return opacus_step(family, device, batch_size, variant.rsplit("-", 1)[1])
    return fastdp_step(family, device, batch_size, fastdp_src, swap=not variant.endswith("-noswap"))


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure(step: Callable[[], None], device: torch.device, warmup: int, steps: int) -> dict:
    """Warm up, then time `steps` calls of `step`; memory is this process's own (RSS on CPU, allocator peak
    on CUDA), the step's share being the peak over what was live before the first call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        sync()
        setup_mib = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    else:
        setup_mib = current_rss_mib()
    for _ in range(warmup):
        step()
    times, cpu_times = [], []
    for _ in range(steps):
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        sync()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else peak_rss_mib()
    # CPU seconds of this process (all its threads) resist other processes' load better than wall time.
    return {"median_s": statistics.median(times), "times_s": times, "median_cpu_s": statistics.median(cpu_times),
            "cpu_times_s": cpu_times, "load_avg": os.getloadavg(), "setup_mib": setup_mib, "peak_mib": peak,
            "step_peak_over_setup_mib": peak - setup_mib, "threads": torch.get_num_threads()}


def paired_times(baseline: Callable[[], None], variant: Callable[[], None], device: torch.device, warmup: int,
                 pairs: int) -> dict:
    """Time `pairs` pairs of steps of the two, one process: the baseline first in even pairs, the variant first
    in odd ones (ABBA), so that a machine speeding up or slowing down favours neither; each pair's ratio is
    variant / baseline."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        baseline()
        variant()
    base_times: list[float] = []
    times: list[float] = []
    for i in range(pairs):
        order = [(base_times, baseline), (times, variant)]
        for record, step in (order if i % 2 == 0 else order[::-1]):
            sync()
            start = time.perf_counter()
            step()
            sync()
            record.append(time.perf_counter() - start)
    ratios = [t / b for t, b in zip(times, base_times)]
    return {"baseline_times_s": base_times, "times_s": times, "ratios": ratios,
            "median_ratio": statistics.median(ratios), "threads": torch.get_num_threads()}


def random_ids(batch_size: int, seq_len: int, vocab_size: int, device: torch.device) -> torch.Tensor:
    """The one fixed batch every timed step sees."""
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator).to(device)


def run_variant(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    step = make_step(args.one, device, args.batch_size, args.seq_len, args.fastdp_src)
    ids = random_ids(args.batch_size, args.seq_len, 50257, device)
    return measure(lambda: step(ids), device, args.warmup, args.steps)


def run_pair(args: argparse.Namespace) -> dict:
    """`args.pair` and its baseline in this one process, timed in pairs (`paired_times`)."""
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    ids = random_ids(args.batch_size, args.seq_len, 50257, device)
    baseline = make_step(VARIANTS[args.pair][0], device, args.batch_size, args.seq_len, args.fastdp_src)
    variant = make_step(args.pair, device, args.batch_size, args.seq_len, args.fastdp_src)
    return paired_times(lambda: baseline(ids), lambda: variant(ids), device, args.warmup, args.steps)


def combine_pairs(runs: list[dict]) -> dict:
    """One row per variant: the median of every pair's ratio over all rounds, and each round's median."""
    ok = [run for run in runs if run["status"] == "ok"]
    if not ok:
        return {**runs[-1], "rounds": runs}
    ratios = [r for run in ok for r in run["ratios"]]
    return {"status": "ok", "threads": ok[0]["threads"], "pairs": len(ratios), "median_ratio": statistics.median(ratios),
            "min_ratio": min(ratios), "max_ratio": max(ratios),
            "round_median_ratios": [run["median_ratio"] for run in ok], "rounds": runs}


def print_pairs(results: dict[str, dict], threads: int) -> None:
    print(f"\n{'variant':<20} {'baseline':<10} {'pairs':>5} {'median ×':>9} {'min–max':>12}  per round  "
          f"(threads={threads}; × = variant / baseline wall time, pair by pair)")
    for variant, row in results.items():
        if row["status"] != "ok":
            print(f"{variant:<20} failed: {row['error'][:150]}")
            continue
        rounds = " / ".join(f"{r:.3f}" for r in row["round_median_ratios"])
        spread = f"{row['min_ratio']:.2f}–{row['max_ratio']:.2f}"
        print(f"{variant:<20} {VARIANTS[variant][0]:<10} {row['pairs']:>5} {row['median_ratio']:>9.3f} {spread:>12}"
              f"  {rounds}")


# ---- the driver: one subprocess per variant -----------------------------------------------------------

def timing_flags(args: argparse.Namespace) -> list[str]:
    """The command-line flags that hand the shared timing settings on to a subprocess."""
    return ["--device", args.device, "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
            "--warmup", str(args.warmup), "--steps", str(args.steps), "--threads", str(args.threads)]


def run_in_subprocess(command: list[str]) -> dict:
    """Run `command` (a Python process printing one RESULT_TAG line); its result, or why it failed."""
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return {"status": "ok", **json.loads(line[len(RESULT_TAG):])}
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    error = next((ln for ln in reversed(lines) if not ln.startswith(" ")), "no output")
    return {"status": "failed", "error": error, "stderr_tail": "\n".join(lines[-25:]), "returncode": proc.returncode,
            "wall_s": time.perf_counter() - started}


def run_rounds(names: list[str], describe: Callable[[str], str], command_for: Callable[[str], list[str]],
               repeats: int, summary: Callable[[dict], str] | None = None) -> dict[str, list[dict]]:
    """Each name's runs, one subprocess per name and round."""
    rounds: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(repeats):
        # Alternate the order, so slow drift in the machine's load does not always favour the same variants.
        for name in names if r % 2 == 0 else names[::-1]:
            print(f"round {r + 1}/{repeats}: {name} ({describe(name)}) ...", flush=True)
            run = run_in_subprocess(command_for(name))
            rounds[name].append(run)
            if run["status"] != "ok":
                done = run["error"]
            elif summary is not None:
                done = summary(run)
            else:
                done = f"median {run['median_s']:.2f}s wall, {run['median_cpu_s']:.2f}s CPU"
            print(f"  {run['status']}: {done}", flush=True)
    return rounds


def machine_facts(device: str, fastdp_src: str | None = None) -> dict:
    import opacus
    import peft
    import transformers

    facts = {"device": device, "platform": platform.platform(), "python": platform.python_version(),
             "cpu_count": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
             "peft": peft.__version__, "opacus": opacus.__version__, "load_avg_at_start": os.getloadavg()}
    if device == "cuda":
        facts["gpu"] = torch.cuda.get_device_name()
    if fastdp_src:
        commit = subprocess.run(["git", "-C", fastdp_src, "rev-parse", "HEAD"], capture_output=True, text=True)
        stamp = Path(fastdp_src, "COMMIT")
        facts["fastdp_commit"] = (commit.stdout.strip() or (stamp.read_text().strip() if stamp.exists() else None))
    return facts


def combine(runs: list[dict]) -> dict:
    """One row per variant: medians over rounds of each round's median time; memory: the largest peak."""
    ok = [run for run in runs if run["status"] == "ok"]
    if not ok:
        return {**runs[-1], "rounds": runs}
    row = {"status": "ok", "threads": ok[0]["threads"], "rounds": runs}
    for key in ("median_s", "median_cpu_s"):
        row[key] = statistics.median(run[key] for run in ok)
    for key in ("peak_mib", "step_peak_over_setup_mib"):
        row[key] = max(run[key] for run in ok)
    return row


def with_ratios(results: dict[str, dict], baseline_of: Callable[[str], str]) -> dict[str, dict]:
    """Ratios to each row's baseline row: wall time, process CPU time and step memory (peak over setup)."""
    for variant, row in results.items():
        base = results.get(baseline_of(variant))
        if row["status"] == "ok" and base and base["status"] == "ok":
            row["time_ratio"] = row["median_s"] / base["median_s"]
            row["cpu_time_ratio"] = row["median_cpu_s"] / base["median_cpu_s"]
            row["memory_ratio"] = row["step_peak_over_setup_mib"] / base["step_peak_over_setup_mib"]
    return results


def print_table(results: dict[str, dict], threads: int, baseline: str = "the matching non-DP step") -> None:
    print(f"\n{'variant':<20} {'wall s':>8} {'×':>6} {'CPU s':>8} {'×':>6} {'peak MiB':>9} {'Δ MiB':>7} {'×':>6}"
          f"  (threads={threads}; × = ratio to {baseline}; Δ = step peak over setup)")
    for variant, row in results.items():
        if row["status"] != "ok":
            print(f"{variant:<20} failed: {row['error'][:150]}")
            continue
        ratios = [f"{row[k]:.2f}" if k in row else "-" for k in ("time_ratio", "cpu_time_ratio", "memory_ratio")]
        print(f"{variant:<20} {row['median_s']:>8.2f} {ratios[0]:>6} {row['median_cpu_s']:>8.2f} {ratios[1]:>6} "
              f"{row['peak_mib']:>9.0f} {row['step_peak_over_setup_mib']:>7.0f} {ratios[2]:>6}")


def add_timing_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by the step-timing scripts."""
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch CPU threads per subprocess (default: torch's default for this machine)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds over all variants, in alternating order")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<script>_<device>.json)")


def check_timing_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("batch_size", "seq_len", "steps", "threads", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be ≥ 0, got {args.warmup}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda given but no CUDA GPU is available")


def write_results(out: Path, args: argparse.Namespace, machine: dict, **fields) -> None:
    """JSON with the command, the timing settings, `machine` (facts taken before the runs) and `fields`
    (which end with the results)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(args, k) for k in ("batch_size", "seq_len", "warmup", "steps", "threads", "repeats")}
    results = fields.pop("results")
    payload = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "settings": settings, **fields,
               "machine": machine, "load_avg_at_end": os.getloadavg(), "results": results}
    out.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"\nwrote {out}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_timing_arguments(parser)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--fastdp-src", default=os.environ.get("FASTDP_SRC"),
                        help="directory holding fastDP's source tree (the one containing fastDP/)")
    parser.add_argument("--paired", action="store_true",
                        help="time each DP variant against its baseline in one process, pair by pair (ABBA); "
                             "--steps is then the number of pairs")
    parser.add_argument("--one", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--pair", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    check_timing_arguments(parser, args)
    if args.paired and all(VARIANTS[v][0] == v for v in args.variants):
        parser.error("--paired needs at least one variant with a baseline other than itself (e.g. bk-full)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.one:
        print(RESULT_TAG + json.dumps(run_variant(args)), flush=True)
        return
    if args.pair:
        print(RESULT_TAG + json.dumps(run_pair(args)), flush=True)
        return
    machine = machine_facts(args.device, args.fastdp_src)
    model = "GPT2Config() defaults (12 layers, 768 hidden, vocab 50257), random weights"
    dp = {"noise_multiplier": NOISE_MULTIPLIER, "max_grad_norm": MAX_GRAD_NORM, "clip_fn": "abadi"}
    fastdp = ["--fastdp-src", args.fastdp_src] if args.fastdp_src else []
    if args.paired:
        variants = [v for v in args.variants if VARIANTS[v][0] != v]
        rounds = run_rounds(variants, lambda v: f"{VARIANTS[v][1]}, paired with {VARIANTS[v][0]}",
                            lambda v: [sys.executable, __file__, "--pair", v, *timing_flags(args), *fastdp],
                            args.repeats, summary=lambda run: f"median ratio {run['median_ratio']:.3f}")
        results = {v: {"description": VARIANTS[v][1], "baseline": VARIANTS[v][0], **combine_pairs(runs)}
                   for v, runs in rounds.items()}
        print_pairs(results, args.threads)
        out = Path(args.out or Path(__file__).parent / "results" / f"step_speed_paired_{args.device}.json")
        write_results(out, args, machine, model=model, dp=dp, paired=True, results=results)
        return
    variants = list(dict.fromkeys([VARIANTS[v][0] for v in args.variants] + args.variants))
    rounds = run_rounds(variants, lambda v: VARIANTS[v][1],
                        lambda v: [sys.executable, __file__, "--one", v, *timing_flags(args), *fastdp], args.repeats)
    results = {v: {"description": VARIANTS[v][1], **combine(runs)} for v, runs in rounds.items()}
    with_ratios(results, lambda v: VARIANTS[v][0])
    print_table(results, args.threads)
    out = Path(args.out or Path(__file__).parent / "results" / f"step_speed_{args.device}.json")
    write_results(out, args, machine, model=model, dp=dp, results=results)


if __name__ == "__main__":
    main()
