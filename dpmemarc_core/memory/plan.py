"""Will it fit, and how? The largest physical micro-batch of each method that fits a memory budget.

The logical batch (the expected Poisson batch the noise and the accountant are set for) is fixed; only
how it is split into micro-batches changes, so a plan never changes the privacy of a run. A micro-batch
fits when its simulated step peak, raised by the simulator's worst reading (it reads up to 15 % low:
`memory.SIMULATION_NOTE`), is within the budget.

The search for one method simulates the logical batch first; when it does not fit, it predicts the
boundary from a line through the peaks known so far (a step's peak is the persistent state plus
activations and engine buffers that grow about linearly in the micro-batch; the first line comes
from the breakdown of the first simulation), simulates the predicted micro-batch and its neighbour,
and narrows until the largest fitting size is simulated on both sides. Typically 1 simulation (the
logical batch fits) or 3. Simulations are cached on disk (`memory_cache`).
"""

from __future__ import annotations

import hashlib
import math
import multiprocessing
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace

import torch

from dpmemarc_core.host_memory import available_ram_bytes
from dpmemarc_core.memory.cache import cache_root, cached
from dpmemarc_core.memory.step import GIB, MemorySpec, step_memory
from dpmemarc_core.privacy.settings import check_count

PLAN_METHODS = ("full", "lora", "adapter", "bitfit", "side", "rev", "zo")
# Among options equally fast (same micro-steps per logical batch), the method that learnt more in the
# quickstart runs at ε = 8 comes first (the accuracies: BENCHMARKS.md, "Quickstart recipe").
METHOD_PREFERENCE = ("adapter", "lora", "rev", "side", "full", "bitfit", "zo")
SIMULATION_LOW_BY = 0.15  # the simulator reads 5-15 % low; plan for the worst reading
# Bytes that do not grow with the micro-batch, by the breakdown's roles (for the first prediction only).
_PERSISTENT_ROLES = ("weights_bytes", "trainable_params_bytes", "grads_bytes", "optimizer_state_bytes")
_BISECT_AFTER = 3  # line predictions that have not closed the interval: bisect instead
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
# K/Ki/KiB ... binary, KB ... decimal (as on a GPU vendor's box), B or nothing: bytes.
_UNITS = {"": 1, "b": 1,
          **{prefix + suffix: 1024 ** power for power, prefix in enumerate("kmgt", 1) for suffix in ("", "i", "ib")},
          **{prefix + "b": 1000 ** power for power, prefix in enumerate("kmgt", 1)}}

Simulate = Callable[[MemorySpec], dict]


def parse_memory_size(text: str, field: str = "--memory") -> int:
    """Bytes of a size such as 8GiB, 7.5 GiB, 8000MB or 8589934592 (K/M/G/T and KiB... binary, KB... decimal)."""
    match = _SIZE.match(str(text))
    unit = match.group(2).lower() if match else None
    if unit not in _UNITS:
        raise ValueError(f"{field} must be a size such as 8GiB, 7.5GiB, 8000MB or a number of bytes, got {text!r}")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size < 1:
        raise ValueError(f"{field} must be at least 1 byte, got {text!r}")
    return size


def required_bytes(peak_bytes: int) -> int:
    """What a simulated peak needs on a GPU when the simulation reads its worst (15 %) low."""
    return math.ceil(peak_bytes / (1 - SIMULATION_LOW_BY))


def simulated_step(spec: MemorySpec) -> dict:
    """`memory.step_memory` on the meta device, cached on disk by the spec."""
    spec = replace(spec, device="meta")
    return cached(asdict(spec), lambda: step_memory(spec))


@dataclass(frozen=True)
class PlanOption:
    """One method at its largest fitting micro-batch (or at micro-batch 1 when even that does not fit)."""

    method: str
    physical_batch_size: int
    peak_bytes: int  # simulated
    fits: bool
    logical_batch_size: int

    @property
    def steps_per_batch(self) -> int:
        """Micro-batches per logical batch of the expected size."""
        return math.ceil(self.logical_batch_size / self.physical_batch_size)

    def as_json(self) -> dict:
        return {"method": self.method, "physical_batch_size": self.physical_batch_size,
                "peak_bytes": self.peak_bytes, "fits": self.fits, "steps_per_batch": self.steps_per_batch,
                "required_bytes": required_bytes(self.peak_bytes)}


def largest_fitting_batch(spec: MemorySpec, budget_bytes: int, simulate: Simulate = simulated_step) -> PlanOption:
    """The largest micro-batch ≤ `spec.batch_size` (the logical batch) whose step fits `budget_bytes`."""
    logical = spec.batch_size
    results: dict[int, dict] = {}

    def peak(size: int) -> int:
        if size not in results:
            results[size] = simulate(replace(spec, batch_size=size))
        return results[size]["peak_bytes"]

    def fits(size: int) -> bool:
        return required_bytes(peak(size)) <= budget_bytes

    def option(size: int, fit: bool) -> PlanOption:
        return PlanOption(spec.method, size, peak(size), fit, logical)

    if fits(logical):
        return option(logical, True)
    lo, hi = 0, logical  # the largest size known to fit (0: none yet), the smallest known not to
    target = budget_bytes * (1 - SIMULATION_LOW_BY)  # the largest simulated peak that fits
    for attempt in range(logical):
        if hi - lo <= 1:
            break
        guess = (lo + hi) // 2 if attempt >= _BISECT_AFTER else _predict(results, target)
        guess = min(max(guess, lo + 1), hi - 1)
        # The guess and its neighbour towards the boundary: where the guess is right, the pair proves it,
        # and where it is not, the pair's slope is the local one the next guess extrapolates with.
        for size in (guess, guess + 1 if fits(guess) else guess - 1):
            if lo < size < hi:
                lo, hi = (size, hi) if fits(size) else (lo, size)
    if lo == 0:
        return option(1, False)
    return option(lo, True)


def _predict(results: dict[int, dict], target: float) -> int:
    """The largest size a line through the two latest simulations puts at or under `target` peak bytes (after
    the first simulation: a line from its breakdown, persistent bytes plus the rest per example)."""
    *_, (a, first), (b, second) = [(None, None), *results.items()]
    if a is None:
        fixed = sum(second["breakdown"][role] for role in _PERSISTENT_ROLES)
        per_example = max(second["peak_bytes"] - fixed, 1) / b
        return math.floor((target - fixed) / per_example)
    slope = (second["peak_bytes"] - first["peak_bytes"]) / (b - a)
    if slope <= 0:  # flat between two sizes (a loss chunk boundary): no direction to extrapolate in
        return (a + b) // 2
    return math.floor(b + (target - second["peak_bytes"]) / slope)


def _method_spec(base: MemorySpec, method: str) -> MemorySpec:
    return replace(base, method=method, zo_params=base.zo_params if method == "zo" else "full")


def _plan_one(base: MemorySpec, method: str, budget_bytes: int) -> PlanOption:
    return largest_fitting_batch(_method_spec(base, method), budget_bytes)


def plan(base: MemorySpec, budget_bytes: int, methods: Sequence[str] = PLAN_METHODS, workers: int = 1,
         simulate: Simulate = simulated_step) -> list[PlanOption]:
    """Every method's option for the logical batch `base.batch_size` in `budget_bytes`, best first.

    Best: fits; then fewest micro-steps per logical batch; then `METHOD_PREFERENCE`. Options that do not
    fit follow, smallest peak first. `workers` > 1 simulates methods in that many forked processes (each
    simulation is single-threaded Python).
    """
    check_count(budget_bytes, "budget_bytes", minimum=1)
    unknown = [m for m in methods if m not in PLAN_METHODS]
    if unknown or not methods:
        raise ValueError(f"method must be one or more of {', '.join(PLAN_METHODS)}, got {list(methods)!r}")
    if workers > 1 and len(methods) > 1 and simulate is simulated_step:
        # fork: the children inherit the imported torch/transformers instead of importing them again (5 s each).
        with ProcessPoolExecutor(min(workers, len(methods)), mp_context=multiprocessing.get_context("fork")) as pool:
            options = list(pool.map(_plan_one, [base] * len(methods), methods, [budget_bytes] * len(methods)))
    else:
        options = [largest_fitting_batch(_method_spec(base, m), budget_bytes, simulate) for m in methods]
    return sorted(options, key=_rank)


def _rank(option: PlanOption) -> tuple:
    if option.fits:
        return (0, option.steps_per_batch, METHOD_PREFERENCE.index(option.method), 0)
    return (1, 0, 0, option.peak_bytes)


def config_file(config) -> str:
    """A config.json holding `config` (a loaded model's `PretrainedConfig`), for `MemorySpec.model`: stored in
    the cache directory under a name made from its content, so equal configs share cached simulations."""
    text = config.to_json_string(use_diff=False)
    path = cache_root() / "configs" / f"{hashlib.sha256(text.encode()).hexdigest()[:24]}.json"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return str(path)


def memory_budget(memory: str | None, device: torch.device) -> int:
    """The budget of `physical batch size auto`: `memory` when given (e.g. "8GiB"), else on a CUDA device its
    free memory plus what this process already holds there (the model, which the simulated step counts too),
    on the CPU the RAM available without swapping. The simulator reads a CPU step's peak too: SmolLM2-135M, LoRA,
    128 examples of 96 tokens in fp32 simulate at 17.2 GiB and peaked at 19 GB resident, within its margin."""
    if memory:
        return parse_memory_size(memory, "memory")
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free) + torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        # The model this process already loaded is not added back (unlike on CUDA): resident memory also holds
        # the libraries and the data, which the simulated step does not count.
        return available_ram_bytes()
    raise ValueError(f"physical batch size 'auto' needs a memory budget on device {device.type!r} (neither CUDA "
                     "nor the CPU's RAM to ask): give one with --memory (run config: memory), e.g. 8GiB")


def auto_physical_batch_size(spec: MemorySpec, budget_bytes: int) -> PlanOption:
    """The largest micro-batch of `spec` (its batch size is the logical one) that fits `budget_bytes`, or a
    ValueError saying what the smallest needs."""
    option = largest_fitting_batch(spec, budget_bytes)
    if not option.fits:
        raise ValueError(f"physical batch size 'auto': {spec.method} does not fit in {budget_bytes / GIB:.2f} GiB "
                         f"even one example at a time (simulated peak {option.peak_bytes / GIB:.2f} GiB, "
                         f"{required_bytes(option.peak_bytes) / GIB:.2f} GiB with the simulator's margin); try "
                         "`dpmemarc plan` for a method that fits, or a shorter max length")
    return option


def format_bytes(size: int) -> str:
    """GiB above 1 GiB, else MiB, with two decimals."""
    return f"{size / GIB:.2f} GiB" if size >= GIB else f"{size / 2 ** 20:.2f} MiB"
