"""What a CUDA GPU would run, emulated for meta tensors: autocast's casts and the fused attention kernel.

Neither exists on the meta device: autocast has no meta dispatch key (a bf16 × fp32 matmul on meta
quietly returns bf16), and `scaled_dot_product_attention` takes the math path, which materialises a
B·H·T·T score tensor that the memory-efficient / flash kernels never build. Both change the peak, so
the simulation reproduces them:

- `MetaAutocast` casts arguments the way CUDA autocast does: matmul-like ops to the low-precision
  dtype, precision-sensitive ops (layer norm, softmax, pow, exp, log, sums, ...) to fp32, and casts
  of trainable leaf parameters are cached for the whole autocast region (which keeps a
  low-precision copy of each trainable weight alive, as autocast's cache does).
- `meta_autocast_queries` answers torch's autocast queries for device "meta" from the open
  `MetaAutocast` regions, so code that saves the autocast state in forward and re-enters it when it
  recomputes in backward (activation checkpointing, reversible layers) recomputes in bf16 here too.
- `meta_values_unknown` lets transformers treat meta tensors like traced ones: it then skips its
  looks at mask and position values (is there padding? packing?), host syncs meta cannot answer.
- `FusedAttention` sends `F.scaled_dot_product_attention` to the memory-efficient kernel, whose meta
  implementation has the CUDA kernel's outputs (output + log-sum-exp, no T×T tensor).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack
from torch.utils._pytree import tree_map

aten = torch.ops.aten
# CUDA autocast's op lists, by the name under which the Python-level function reaches a TorchFunctionMode
# (torch.X, Tensor.X and F.X alike). Lower precision: matmul-like ops.
_LOW = frozenset({"linear", "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "addmm", "baddbmm", "addbmm", "addmv",
                  "mv", "addr", "einsum", "chain_matmul", "multi_dot", "prelu", "conv1d", "conv2d", "conv3d",
                  "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "scaled_dot_product_attention"})
# fp32: precision-sensitive ops (autocast gives some of them a dtype=float32 argument instead; the
# result is the same fp32 tensor, we only add a transient input copy).
_FP32 = frozenset({"layer_norm", "group_norm", "softmax", "log_softmax", "cross_entropy", "nll_loss", "mse_loss",
                   "l1_loss", "smooth_l1_loss", "huber_loss", "kl_div", "binary_cross_entropy_with_logits", "pow",
                   "__pow__", "__rpow__", "exp", "log", "log2", "log10", "log1p", "expm1", "rsqrt", "reciprocal",
                   "acos", "asin", "cosh", "sinh", "tan", "erfinv", "softplus", "logsumexp", "cumsum", "cumprod",
                   "prod", "sum", "norm", "vector_norm", "matrix_norm", "dist", "cdist", "renorm",
                   "cosine_similarity"})
_LOW_FLOATS = (torch.float16, torch.bfloat16)
_ACTIVE: list = []  # the open MetaAutocast regions, innermost last; None: autocast(enabled=False)


class MetaAutocast(TorchFunctionMode):
    """CUDA autocast to `dtype` (bf16 or fp16) for meta tensors, for one autocast region.

    Casting happens above autograd, where autocast works, so autograd saves the cast copies (a matmul
    of an fp32 activation keeps its bf16 copy, not the fp32 tensor), as on a GPU.
    """

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        if dtype not in _LOW_FLOATS:
            raise ValueError(f"autocast dtype must be float16 or bfloat16, got {dtype}")
        self.dtype = dtype
        self._cache: dict[int, torch.Tensor] = {}

    def __enter__(self):
        _ACTIVE.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        _ACTIVE.pop()
        self._cache.clear()  # autocast drops its cast cache when the region ends
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", None)
        if _ACTIVE[-1] is not self:  # the innermost region decides (or autocast(enabled=False) is open)
            return func(*args, **kwargs)
        if name in _LOW:
            args, kwargs = tree_map(self._to_low, (args, kwargs))
        elif name in _FP32:
            args, kwargs = tree_map(_to_fp32, (args, kwargs))
        return func(*args, **kwargs)

    def _to_low(self, x):
        if not (isinstance(x, torch.Tensor) and x.is_floating_point()) or x.dtype in (self.dtype, torch.float64):
            return x
        if not (x.is_leaf and x.requires_grad):
            return x.to(self.dtype)
        # Autocast caches casts of trainable leaves (the fp32 master weights) for the whole region.
        cast = self._cache.get(id(x))
        if cast is None:
            cast = self._cache[id(x)] = x.to(self.dtype)
        return cast


def _to_fp32(x):
    if isinstance(x, torch.Tensor) and x.dtype in _LOW_FLOATS:
        return x.float()
    return x


class FusedAttention(TorchFunctionMode):
    """`F.scaled_dot_product_attention` → the memory-efficient kernel (what CUDA picks for these shapes).

    Torch function modes are off inside a custom autograd Function's backward, where recomputing code
    (reversible layers) calls attention again. So while the mode is open, `F.scaled_dot_product_attention`
    is also swapped for `_fused_outside_the_mode`, which reaches the kernel from there too.
    """

    def __enter__(self):
        self._replaced = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = _fused_outside_the_mode
        return super().__enter__()

    def __exit__(self, *exc):
        F.scaled_dot_product_attention = self._replaced
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _SDPA:
            return _efficient_attention(*args, **kwargs)
        return func(*args, **kwargs)


_SDPA = F.scaled_dot_product_attention


def _fused_outside_the_mode(*args, **kwargs):
    if any(isinstance(mode, FusedAttention) for mode in _get_current_function_mode_stack()):
        return _SDPA(*args, **kwargs)  # the modes see the call: autocast's cast, then the kernel
    region = _ACTIVE[-1] if _ACTIVE else None  # an autocast region the backward opened itself
    if region is not None:
        args, kwargs = tree_map(region._to_low, (args, kwargs))
    return _efficient_attention(*args, **kwargs)


def _efficient_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                         enable_gqa=False):
    if query.dim() != 4:
        return _SDPA(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
    batch, heads, q_len, _ = query.shape
    if key.shape[1] != heads:  # grouped-query attention: the kernel wants one key/value head per query head
        key = key.repeat_interleave(heads // key.shape[1], dim=1)
        value = value.repeat_interleave(heads // value.shape[1], dim=1)
    bias = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:  # as SDPA does before calling a kernel: a -inf additive bias
            bias = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device)
            bias = bias.masked_fill(~attn_mask, float("-inf"))
        else:
            bias = attn_mask.to(query.dtype)
        bias = bias.expand(batch, heads, q_len, key.shape[2])
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    return aten._scaled_dot_product_efficient_attention(query, key, value, bias, needs_grad, dropout_p, is_causal,
                                                        scale=scale)[0]


@contextmanager
def meta_values_unknown() -> Iterator[None]:
    """Within: transformers' `is_tracing(t)` is true for meta tensors, so it builds masks without reading values."""
    from transformers import masking_utils, modeling_utils

    modules = (masking_utils, modeling_utils)
    originals = [m.is_tracing for m in modules]

    def is_tracing(tensor=None, _original=originals[0]) -> bool:
        return (isinstance(tensor, torch.Tensor) and tensor.device.type == "meta") or _original(tensor)

    for m in modules:
        m.is_tracing = is_tracing
    try:
        yield
    finally:
        for m, original in zip(modules, originals):
            m.is_tracing = original


@contextmanager
def _autocast_off() -> Iterator[None]:
    _ACTIVE.append(None)
    try:
        yield
    finally:
        _ACTIVE.pop()


@contextmanager
def meta_autocast_queries() -> Iterator[None]:
    """Within: `torch.amp.is_autocast_available("meta")`, `torch.is_autocast_enabled("meta")`,
    `torch.get_autocast_dtype("meta")` and `torch.autocast("meta", ...)` / `torch.amp.autocast` work, backed by
    `MetaAutocast`; every other device is answered by torch as usual."""
    originals = {"available": torch.amp.is_autocast_available, "enabled": torch.is_autocast_enabled,
                 "dtype": torch.get_autocast_dtype, "autocast": torch.autocast}

    def is_autocast_available(device_type: str) -> bool:
        return device_type == "meta" or originals["available"](device_type)

    def is_autocast_enabled(*args) -> bool:
        if args[:1] == ("meta",):
            return bool(_ACTIVE) and _ACTIVE[-1] is not None
        return originals["enabled"](*args)

    def get_autocast_dtype(device_type: str) -> torch.dtype:
        if device_type == "meta":
            return next((region.dtype for region in reversed(_ACTIVE) if region is not None), torch.bfloat16)
        return originals["dtype"](device_type)

    def autocast(device_type: str, dtype: torch.dtype | None = None, enabled: bool = True, cache_enabled=None):
        if device_type != "meta":
            return originals["autocast"](device_type, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)
        if enabled:
            return MetaAutocast(dtype or get_autocast_dtype("meta"))
        return _autocast_off() if _ACTIVE else nullcontext()

    patches = [(torch.amp, "is_autocast_available", is_autocast_available),
               (torch, "is_autocast_enabled", is_autocast_enabled), (torch, "get_autocast_dtype", get_autocast_dtype),
               (torch, "autocast", autocast), (torch.amp, "autocast", autocast)]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, replacement in patches:
        setattr(owner, name, replacement)
    try:
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)
