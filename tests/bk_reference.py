"""Reference for BK tests: per-example gradients one example at a time, in float64, then clipped and summed."""

from __future__ import annotations

from collections.abc import Callable

import torch

from dpmemarc_core.privacy import BKEngine

LossFn = Callable[[torch.nn.Module, dict], torch.Tensor]  # (model, batch) -> per-example loss [B]


def _slice(batch: dict, i: int) -> dict:
    return {k: v[i:i + 1] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def clipped_reference(model: torch.nn.Module, batch: dict, loss_fn: LossFn, max_grad_norm: float,
                      clip_fn: str = "abadi", gamma: float = 0.01, groups: list[list[str]] | None = None,
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Unclipped per-example norms and Σ_i c_i g_i per trainable parameter name. `groups` (parameter names):
    group-wise clipping, each group's part of g_i scaled by its own factor at bound C/√K."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = groups or [[n for n, _ in named]]
    group_of = {n: k for k, names in enumerate(groups) for n in names}
    bound = max_grad_norm / len(groups) ** 0.5
    params = [p for _, p in named]
    size = next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0]
    per_example, norms = [], []
    for i in range(size):
        loss = loss_fn(model, _slice(batch, i))[0]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
        per_example.append(grads)
        norms.append(torch.stack([torch.sqrt(sum((g.double() ** 2).sum() for g, (n, _) in zip(grads, named)
                                                 if group_of[n] == k)) for k in range(len(groups))]))
    group_norms = torch.stack(norms, dim=1)  # [K, B]
    if clip_fn == "abadi":
        factors = (bound / group_norms).clamp(max=1.0)
    else:
        factors = bound / (group_norms + gamma)
    sums = {n: sum(factors[group_of[n], i] * per_example[i][j].double() for i in range(size))
            for j, (n, _) in enumerate(named)}
    return group_norms.pow(2).sum(0).sqrt(), sums


def bk_result(model: torch.nn.Module, batch: dict, loss_fn: LossFn, **engine_kwargs) -> tuple[
        torch.Tensor, dict[str, torch.Tensor], BKEngine]:
    """Norms and `.grad` after one BKEngine.clipped_backward (engine detached afterwards)."""
    model.zero_grad(set_to_none=True)
    engine = BKEngine(model, **engine_kwargs)
    try:
        norms = engine.clipped_backward(loss_fn(model, batch))
    finally:
        engine.detach()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return norms, grads, engine


def assert_bk_matches_reference(model: torch.nn.Module, batch: dict, loss_fn: LossFn, rtol: float = 1e-6,
                                **engine_kwargs) -> BKEngine:
    """BK's norms and clipped sums equal the one-at-a-time float64 reference to `rtol` (relative, per tensor)."""
    max_grad_norm = engine_kwargs.get("max_grad_norm", 1.0)
    norms, grads, engine = bk_result(model, batch, loss_fn, **engine_kwargs)
    ref_norms, ref_sums = clipped_reference(model, batch, loss_fn, max_grad_norm,
                                            engine_kwargs.get("clip_fn", "abadi"), engine_kwargs.get("gamma", 0.01))
    torch.testing.assert_close(norms.double(), ref_norms, rtol=rtol, atol=0)
    # The test must be able to fail: clipping has to bite on at least one example.
    assert (ref_norms > max_grad_norm).any() or engine_kwargs.get("clip_fn") == "automatic"
    # A tensor whose true gradient is exactly zero (e.g. BERT's key bias: softmax ignores it) is judged
    # against the largest gradient of the model, so rounding noise over zero does not fail the test.
    floor = 1e-9 * max(ref.abs().max().item() for ref in ref_sums.values())
    for name, ref in ref_sums.items():
        scale = ref.abs().max().clamp(min=max(floor, 1e-30))
        err = ((grads[name].double() - ref).abs().max() / scale).item()
        assert err <= rtol, f"{name}: relative error {err:.2e} > {rtol:.0e}"
    return engine
