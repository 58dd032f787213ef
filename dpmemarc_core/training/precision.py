"""One precision set-up for every training step: `dpmemarc train`, the Flower client and `dpmemarc memory`.

| precision | frozen weights | trainable weights          | forward                  |
|-----------|----------------|----------------------------|--------------------------|
| bf16      | bf16           | fp32 master copies         | autocast bf16            |
| fp16      | fp16           | fp32 master copies         | autocast fp16, loss scale|
| amp-bf16  | fp32           | fp32                       | autocast bf16 (plain AMP)|
| fp32      | fp32           | fp32                       | no autocast              |

Autocast covers each forward of the model and nothing else (the AMP recipe): the per-example loss is
formed in fp32 from the logits (`losses`), the backward runs in the dtypes the forward saved, BK forms
norms and clip factors in fp32 (`privacy.layers.contributions.norm_dtype`), and the clipped sums land in
the fp32 `.grad` of the master copies, where noise and Adam work. DPZero (`zo`) has no optimizer and so
no master copy: its perturbed weights stay in the frozen dtype (MeZO's half-precision recipe).

Default: bf16 on a CUDA GPU that supports it, fp32 elsewhere (CPU autocast is slow and DP on a CPU is
about small models). Models are loaded (or built) in `frozen_dtype(precision)` and then handed to
`prepare_model`, which the trainers call, so no caller can run the step in another set-up.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from contextlib import nullcontext
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

# precision → (dtype of the frozen weights, autocast dtype of the forward or None).
PRECISIONS: dict[str, tuple[torch.dtype, torch.dtype | None]] = {
    "bf16": (torch.bfloat16, torch.bfloat16), "fp16": (torch.float16, torch.float16), "fp32": (torch.float32, None),
    "amp-bf16": (torch.float32, torch.bfloat16)}
AUTO = "auto"


def default_precision(device: torch.device | str) -> str:
    """bf16 on a CUDA GPU that supports it, else fp32."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def resolve_precision(name: str | None, device: torch.device | str) -> str:
    """`name`, checked; None or "auto": the device's default."""
    if name is None or name == AUTO:
        return default_precision(device)
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)} or {AUTO!r}, got {name!r}")
    return name


def frozen_dtype(precision: str) -> torch.dtype:
    """The dtype to load or build the backbone in."""
    _check(precision)
    return PRECISIONS[precision][0]


def _check(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def autocast_context(precision: str, device_type: str):
    """Autocast of `precision` for code that runs whole models outside the trainer (evaluation, generation)."""
    _check(precision)
    low = PRECISIONS[precision][1]
    return nullcontext() if low is None else torch.autocast(device_type, dtype=low)


class _ForwardAutocast:
    """Enters autocast when the model's forward starts and leaves it when it ends (also on an exception)."""

    def __init__(self, model: nn.Module, device_type: str, dtype: torch.dtype) -> None:
        self.device_type, self.dtype = device_type, dtype
        self._regions: list = []
        self._handles = [model.register_forward_pre_hook(self._enter),
                         model.register_forward_hook(self._leave, always_call=True)]

    def _enter(self, *_) -> None:
        # torch.autocast("meta", ...) is the memory simulation's emulation (memory_emulation.meta_autocast_queries).
        region = torch.autocast(self.device_type, dtype=self.dtype)
        region.__enter__()
        self._regions.append(region)

    def _leave(self, *_) -> None:
        self._regions.pop().__exit__(None, None, None)


def prepare_model(model: nn.Module, precision: str, device: torch.device | str, master_copies: bool = True) -> None:
    """Set `model` up for training in `precision` on `device`: trainable weights in fp32 (`master_copies`;
    DPZero passes False) and autocast around each forward. Frozen weights keep the dtype they were loaded
    in (`frozen_dtype`). Idempotent for one precision; a second, different precision is an error."""
    _check(precision)
    done = getattr(model, "_dpmemarc_precision", None)
    if done is not None:
        if done != precision:
            raise ValueError(f"the model is already set up for precision {done!r}, not {precision!r}")
        return
    if master_copies:
        for p in model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
    low = PRECISIONS[precision][1]
    if low is not None:
        model._dpmemarc_autocast = _ForwardAutocast(model, torch.device(device).type, low)
        if torch.device(device).type == "cpu":
            _norms_in_fp32(model)
    model._dpmemarc_precision = precision


def _norms_in_fp32(model: nn.Module) -> None:
    """CUDA autocast runs layer norms in fp32; CPU autocast leaves them out, and a norm holding an fp32 (master)
    parameter fed bf16 activations then fails. Run those norms in fp32, as CUDA autocast would."""
    for module in model.modules():
        if isinstance(module, (nn.LayerNorm, nn.RMSNorm)) and any(
                p.dtype == torch.float32 for p in module.parameters(recurse=False)):
            module.forward = partial(_fp32_norm, module)


def _fp32_norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    weight = None if module.weight is None else module.weight.float()
    if isinstance(module, nn.RMSNorm):
        return F.rms_norm(x.float(), module.normalized_shape, weight, module.eps)
    bias = None if module.bias is None else module.bias.float()
    return F.layer_norm(x.float(), module.normalized_shape, weight, bias, module.eps)


class LossScaler:
    """Dynamic loss scaling for fp16, correct under per-example clipping.

    The per-example losses are multiplied by the scale S before the clipped backward, so the fp16
    activation gradients keep their small values. BK divides the per-example norms by S before it forms
    the clip factors (clipping sees the true norms, in fp32), and an example whose scaled gradient
    overflowed (a non-finite norm) gets clip factor 0: its contribution is zero, still of norm ≤ C, so
    the sensitivity of the clipped sum stays C and one bad example never spoils the step. The clipped sum
    arrives S times too large in the fp32 `.grad`; `unscale_` divides it before the noise is added.

    If the unscaled sum is still not finite (an overflow that crossed examples, e.g. in the second pass of
    two-pass BK), the step is skipped (no noise, no update) and still counted by the accountant: the
    Poisson batch was drawn and its examples used, and not counting it would let a data-dependent event
    buy budget back and leave fewer steps than the noise was calibrated for. What such a skip reveals
    (that this batch overflowed) is outside the Gaussian mechanism; per-example zeroing makes it rare,
    and bf16, with fp32's exponent range and no scaler, is the default for that reason. S halves after
    an overflow (any example's) and doubles after `growth_interval` steps without one.
    """

    def __init__(self, init_scale: float = 2.0 ** 16, growth_interval: int = 2000) -> None:
        if not (math.isfinite(init_scale) and init_scale > 0):
            raise ValueError(f"init_scale must be a finite number > 0, got {init_scale!r}")
        self.scale = float(init_scale)
        self.growth_interval = growth_interval
        self._clean_steps = 0
        self.skipped_steps = 0

    def unscale_(self, params: Iterable[torch.Tensor], overflowed: torch.Tensor | bool) -> bool:
        """Divide the gradients by S; update S. `overflowed`: whether some example's norm was non-finite.
        Returns whether the step may be taken (every gradient finite). One host sync per step (none on meta)."""
        grads = [p.grad for p in params if p.grad is not None]
        for g in grads:
            g.div_(self.scale)
        if grads and grads[0].device.type == "meta":
            return True
        finite = bool(torch.stack([g.isfinite().all() for g in grads]).all()) if grads else True
        if not finite or bool(overflowed):
            self.scale /= 2
            self._clean_steps = 0
        else:
            self._clean_steps += 1
            if self._clean_steps % self.growth_interval == 0:
                self.scale *= 2
        if not finite:
            self.skipped_steps += 1
        return finite

