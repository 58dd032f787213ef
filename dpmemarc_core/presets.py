"""Named starting points for a single-site run (`dpmemarc train --preset NAME`).

`paper` is the paper's setting (B=32, T=128, DP-Adam lr 5e-4, LoRA/adapter r=64, one epoch here): what the
library's TrainConfig defaults are. It needs a GPU and far more steps than a CPU allows; on MiniLM with 2000
examples it learns nothing in one epoch at ε=8.

`quick` (the CLI's default) is what was measured to learn on a 2-core CPU in a few minutes, at ε=8 on the
offline MiniLM + movie snippets (see BENCHMARKS.md, "Quickstart"): a larger expected batch (more signal per
unit of noise), three epochs of 2000 examples, short sequences, a higher learning rate and rank-1 LoRA. Rank
matters more than anything else under DP here: at r=64 the noise spread over ~0.3M LoRA coordinates drowned
the signal (51 % after 47 steps), at r=1 the same run reached 60–65 %; rev (r=1) 65 %, side (reduction 16, lr 2e-3) 60 %.
"""

from __future__ import annotations

from dataclasses import replace

from dpmemarc_core.train import TrainConfig

PRESETS = ("quick", "paper")

# Per method: (learning rate, method options) of the quick preset. Methods not listed keep the paper's.
_QUICK_METHODS: dict[str, tuple[float, dict]] = {
    "lora": (5e-3, {"r": 1}),
    "rev": (5e-3, {"r": 1}),
    "adapter": (5e-3, {"bottleneck": 1}),
    "bitfit": (5e-3, {}),
    "side": (2e-3, {"reduction": 16}),
}


def preset_config(name: str, method: str = "lora", **overrides) -> TrainConfig:
    """The TrainConfig of preset `name` for `method`; keyword arguments override any field (method_options
    are merged over the preset's)."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {name!r}")
    cfg = TrainConfig(method=method)
    if name == "quick":
        lr, options = _QUICK_METHODS.get(method, (None, {}))
        cfg = replace(cfg, batch_size=128, epochs=3.0, max_length=48, max_train=2000, max_eval=500, lr=lr,
                      method_options=dict(options))
    options = {**cfg.method_options, **overrides.pop("method_options", {})}
    return replace(cfg, method_options=options, **overrides)
