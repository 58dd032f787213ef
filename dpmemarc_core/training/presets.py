"""Named starting points for a single-site run (`dpmemarc train --preset NAME`).

`long` is `quick` at a four times larger expected batch over four epochs: the same number of steps, a
better signal-to-noise ratio per step at the same ε, four times the compute (times: BENCHMARKS.md, "The long preset").
The side network trains sixteen epochs in it (`_LONG_EPOCHS_OF`): four times the steps, at little more cost.

`paper` is the paper's setting (B=32, T=128, DP-Adam lr 5e-4, LoRA/adapter r=64, one epoch): the library's
TrainConfig defaults, with the paper's δ = 1/N instead of the library's 1/(10N). It is meant for a GPU and
the paper's 50k examples; on the offline MiniLM + movie snippets it barely moves in the steps a CPU allows
(BENCHMARKS.md, "Quickstart recipe").

`quick` (the CLI's default) is what was measured to learn on a 2-core CPU in a few minutes, at ε=8 on the
offline MiniLM + movie snippets (BENCHMARKS.md, "Private recipe"; the older "Quickstart recipe" shows how it
got here): one epoch of all training examples at expected batch 128 (74 Poisson steps), short sequences, the
smallest trainable part of each method at a rate it survives under DP noise, and the classifier head at its
own larger rate (`QUICK_HEAD_LR`). Size matters under DP: noise of one scale lands on every trainable
coordinate, so a large LoRA rank stays near chance in the steps where r=1 learns (BENCHMARKS.md,
"Quickstart recipe"). What decides most is the head: a mean-pooling encoder is classified from the mean of
its token states (`dpmemarc_core.pooling`), and the head, which starts from scratch, needs a rate the
backbone's part cannot take; for full fine-tuning it also needs its own share of the clipping norm
(`_HEAD_APART`), and in a private run the side network's head trains alone for the first three quarters of
the steps (`_PROBE_FRACTION_OF`).
"""

from __future__ import annotations

import math
from dataclasses import replace

from dpmemarc_core.data import task_kind_of
from dpmemarc_core.training.config import TrainConfig

PRESETS = ("quick", "long", "paper")
# The classifier head's DP-Adam rate in the quick preset: the private probe (benchmarks/private_probe.py) on
# validation learned best at 2e-2 in one epoch, where the backbone's part takes 5e-3 at most.
QUICK_HEAD_LR = 2e-2

# The long preset: quick's choices at four times the batch over four epochs (the same 74 steps, four times the
# compute). At a fixed ε a larger expected batch raises each step's signal faster than the accountant raises
# σ; the private probe on validation gained ~1.4 points from B=128 × 1 epoch to B=512 × 4 (BENCHMARKS.md,
# "Steps, batch and head rate at a fixed ε").
LONG_BATCH_SIZE, LONG_EPOCHS = 512, 4.0
# Methods that train more epochs in the long preset. The side network reads the frozen backbone's states, which
# a run that sees each example more than once keeps after the first epoch (methods/side/state_cache.py): later
# epochs cost only the d/16-wide side network, so 16 epochs took 2x the time of 4 (797 s vs 395 s, one core).
# Chosen on validation (seed 0, ε = 8, 951 snippets): 4 epochs 77.5 %, 16 epochs 79.6 % (BENCHMARKS.md,
# "The side network at 16 epochs").
_LONG_EPOCHS_OF = {"side": 16.0}
# Methods whose classifier head trains alone for the first part of the steps in a private classification run
# of the quick/long presets (DP linear probing, then fine-tuning: training/probe_first.py). The side network's
# head at init reads the backbone's pooled state (its up-projection starts at zero), so its first steps are a
# private linear probe. On validation (seeds 0-1, ε = 8, 951 snippets; BENCHMARKS.md, "Linear probing, then the
# side network"): long 0 % of the steps 78.3 % (eval loss 0.91), 50 % 78.5 (0.79), 75 % 78.5 (0.72) in two
# thirds of the time; quick 0 % 74.9 (0.68), 75 % 76.1 (0.63). Private runs only: it spares the side network's
# coordinates the noise, and without noise it only takes steps from them (at ε = ∞ it cost long side 2.7 points).
_PROBE_FRACTION_OF = {"side": 0.75}

# Per method: (learning rate, method options) of the quick preset. Methods not listed keep the paper's.
_QUICK_METHODS: dict[str, tuple[float, dict]] = {
    "lora": (5e-3, {"r": 1}),
    "rev": (5e-3, {"r": 1}),
    "adapter": (5e-3, {"bottleneck": 1}),
    "bitfit": (5e-3, {}),
    "side": (5e-4, {"reduction": 16}),
    "full": (1e-4, {}),
}
# Methods whose classifier head gets its own clipping budget in the quick/long presets (PrivacySettings
# clip_groups "head"): full fine-tuning's ~22 M body coordinates otherwise take most of each example's clipped
# norm (chosen on validation; BENCHMARKS.md, "The long preset and clipping the head apart"). A generation task
# has no classifier head and keeps one norm.
_HEAD_APART = ("full",)


def preset_config(name: str, method: str = "lora", **overrides) -> TrainConfig:
    """The TrainConfig of preset `name` for `method`; keyword arguments override any field (method_options
    are merged over the preset's)."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {name!r}")
    cfg = TrainConfig(method=method)
    if name == "paper":
        cfg = replace(cfg, delta="1/N")  # the paper's δ; the library's default 1/(10N) is stricter
    if name in ("quick", "long"):
        lr, options = _QUICK_METHODS.get(method, (None, {}))
        head_lr = QUICK_HEAD_LR if method != "zo" else None
        cfg = replace(cfg, batch_size=128, epochs=1.0, max_length=48, max_train=None, max_eval=None, lr=lr,
                      head_lr=head_lr, method_options=dict(options))
    if name == "long":
        cfg = replace(cfg, batch_size=LONG_BATCH_SIZE, epochs=_LONG_EPOCHS_OF.get(method, LONG_EPOCHS))
    options = {**cfg.method_options, **overrides.pop("method_options", {})}
    cfg = replace(cfg, method_options=options, **overrides)
    classifies = task_kind_of(cfg.task) == "classification"
    if name in ("quick", "long") and method in _HEAD_APART and "clip_groups" not in overrides and classifies:
        cfg = replace(cfg, clip_groups="head")
    if name in ("quick", "long") and method in _PROBE_FRACTION_OF and "probe_fraction" not in overrides \
            and classifies and math.isfinite(cfg.epsilon):
        cfg = replace(cfg, probe_fraction=_PROBE_FRACTION_OF[method])
    return cfg
