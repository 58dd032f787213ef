"""What one call of a trainable layer contributes to each example's gradient of one parameter.

A handler turns a layer's stored input `a` and output gradient `g` into one of these per
parameter. Two forms exist because BK chooses per layer between them:

- `Instantiated`: the per-example gradient itself, shape (B, *param.shape). Cheap for small
  parameters (biases, norms, LoRA factors at long sequences).
- `Factored`: the per-example gradient kept as `Σ_t left[b,t] ⊗ right[b,t]` (rows × cols of the
  parameter as stored). Its squared norm is a T×T "ghost" product and it is never formed.
  `left_ids` replaces a dense `left` by one-hot rows (embeddings), so a V-wide one-hot is
  never built either.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Instantiated:
    per_example: torch.Tensor  # (B, *param.shape)


@dataclass
class Factored:
    right: torch.Tensor  # (B, T, cols)
    left: torch.Tensor | None = None  # (B, T, rows), dense
    left_ids: torch.Tensor | None = None  # (B, T) row indices: one-hot left

    @property
    def batch_size(self) -> int:
        return self.right.shape[0]


def as_btd(x: torch.Tensor) -> torch.Tensor:
    """(B, d) and (B, ..., d) → (B, T, d): every middle dim is a "token" dim for the sums over t."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """Norms and clip factors are formed in at least fp32 (bf16 sums of squares lose the clip)."""
    return torch.promote_types(dtype, torch.float32)


def left_gram(u: Factored, v: Factored) -> torch.Tensor:
    """⟨left_u[b,t], left_v[b,s]⟩ for all t, s: shape (B, Tu, Tv)."""
    if u.left is not None and v.left is not None:
        dt = norm_dtype(u.left.dtype)
        return torch.bmm(u.left.to(dt), v.left.to(dt).transpose(1, 2))
    if u.left_ids is not None and v.left_ids is not None:
        return (u.left_ids[:, :, None] == v.left_ids[:, None, :]).to(norm_dtype(u.right.dtype))
    if u.left is None:  # u one-hot, v dense: v.left[b, s, ids_u[b, t]]
        return left_gram(v, u).transpose(1, 2)
    # u dense, v one-hot: u.left[b, t, ids_v[b, s]]
    batch, t_u, _ = u.left.shape
    index = v.left_ids[:, None, :].expand(batch, t_u, v.left_ids.shape[1])
    return u.left.gather(2, index).to(norm_dtype(u.left.dtype))


def factored_inner(u: Factored, v: Factored) -> torch.Tensor:
    """Per-example ⟨Σ_t l_t r_tᵀ, Σ_s l'_s r'_sᵀ⟩ = Σ_{t,s} ⟨l_t,l'_s⟩⟨r_t,r'_s⟩, shape (B,)."""
    dt = norm_dtype(u.right.dtype)
    right = torch.bmm(u.right.to(dt), v.right.to(dt).transpose(1, 2))
    return (left_gram(u, v) * right).sum(dim=(1, 2))


def factored_clipped_sum(f: Factored, scale: torch.Tensor, shape: torch.Size,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_b scale_b Σ_t left[b,t] ⊗ right[b,t], in the norm dtype, shape `shape` (rows, cols).

    With `out` (the sum of a parameter's other uses so far, in the norm dtype) the result is added into it
    and `out` returned: a one-hot use then scatters into it instead of into a new zero table (the tied
    embedding's V×d, twice over, otherwise).
    """
    dt = norm_dtype(f.right.dtype)
    scale = scale.to(dt)[:, None, None]
    left, right = (None if f.left is None else f.left.to(dt)), f.right.to(dt)
    if left is not None and left.shape[-1] < right.shape[-1]:
        left = left * scale  # scale the narrower factor: B·T·min(rows, cols) products instead of B·T·cols
    else:
        right = right * scale
    right = right.flatten(0, 1)
    if left is not None:
        part = left.flatten(0, 1).transpose(0, 1) @ right
        return part if out is None else out.add_(part)
    if out is None:
        out = torch.zeros(shape, dtype=dt, device=right.device)
    return out.index_add_(0, f.left_ids.flatten(), right)


def instantiated_clipped_sum(per_example: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    dt = norm_dtype(per_example.dtype)
    return torch.tensordot(scale.to(dt), per_example.to(dt), dims=1)


class GhostRule:
    """Decides, per layer call, whether a weight's per-example gradient stays factored.

    "mixed" instantiates the per-example gradient (B, rows, cols) when either
    - BK-MixOpt's rule holds: 2T² ≥ rows·cols (the ghost norm's ~B·T² per layer is the dearer), or
    - it is no larger in bytes than the a and g the factored form keeps (B·T·(rows + cols) numbers, each in its
      own dtype): then it also costs fewer FLOPs (B·T·rows·cols ≤ B·T²·(rows + cols)) and releases a and g at
      once. LoRA's factors at T = 128 are such layers: their ghost form took 2.5x the time of the per-example
      gradient (`benchmarks/ghost_rule.py`; BENCHMARKS.md, "Step time"). The bytes count the per-example gradient in its
      dtype (fp32 for fp32 weights under bf16 activations), so it never holds more than the factored form.
    and keeps it factored otherwise. A parameter used more than once in the forward (tied embedding and LM head,
    a module called twice) is always factored: the cross terms between its uses need it.
    """

    def __init__(self, mode: str, shared: set[int]) -> None:
        self.mode = mode
        self.shared = shared

    def __call__(self, param: torch.Tensor, a: torch.Tensor, g: torch.Tensor) -> bool:
        """Whether `param`, whose layer saw input `a` and output gradient `g` (both (B, T, ·)), stays factored."""
        if id(param) in self.shared or self.mode == "ghost":
            return True
        if self.mode == "instantiate":
            return False
        seq_len, size = a.shape[1], a.shape[-1] * g.shape[-1]
        if 2 * seq_len * seq_len >= size:
            return False
        per_example_bytes = size * torch.promote_types(param.dtype, g.dtype).itemsize
        factored_bytes = seq_len * (a.shape[-1] * a.element_size() + g.shape[-1] * g.element_size())
        return per_example_bytes > factored_bytes
