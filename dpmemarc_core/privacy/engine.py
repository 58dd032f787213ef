"""Book-keeping (BK) per-example clipping: one forward, one backward, clipped sum from stored a and g.

Each trainable layer's output passes through a tap (an identity autograd node). The backward is run
with the taps' shared anchor as its only input, so autograd computes every activation gradient but no
weight gradient: weight gradients are formed once, already clipped, from `a` and `g`. Layer rules live
in `layers/`; this file only orchestrates them and never knows which fine-tuning method it serves.
"""

from __future__ import annotations

import math
import weakref
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from dpmemarc_core.privacy.clip import (
    AUTOMATIC_GAMMA,
    CLIP_FNS,
    CLIPPING_MODES,
    clip_factors,
)
from dpmemarc_core.privacy.layers import SUPPORTED, GhostRule, handler_for
from dpmemarc_core.privacy.layers.contributions import (
    Factored,
    Instantiated,
    factored_clipped_sum,
    factored_inner,
    instantiated_clipped_sum,
    norm_dtype,
)

BATCH_KEYS = ("input_ids", "inputs_embeds", "attention_mask", "labels")
BACKWARD_PASSES = (1, 2, "auto")
# backward_passes="auto" keeps BK buffers (as one pass does) while they hold at most this many of the largest
# layer input or output-gradient tensors seen in the pass: a reversible stack's backward already holds one
# sub-layer's graph with several such tensors, so this leaves its O(1)-in-depth peak in the same order.
KEEP_BUDGET_TENSORS = 2
_TAPPING: dict[int, torch.Tensor] = {}  # by id: anchors of engines whose BK backward pass is running now
_ATTACHED: "weakref.WeakSet[BKEngine]" = weakref.WeakSet()


def bk_anchors_of(module: nn.Module) -> list[torch.Tensor]:
    """Anchors of the attached engines that hook `module` or any of its submodules.

    A BK pass back-propagates to its anchor only, and autograd skips nodes that do not lead there.
    A custom autograd Function whose forward runs hooked layers out of autograd's sight (a
    reversible stack) takes these anchors as extra inputs at forward time, so its backward is on
    the path; inside that backward it then uses `bk_backward_inputs()`.
    """
    ids = {id(m) for m in module.modules()}
    return [engine._anchor for engine in list(_ATTACHED) if ids & engine._hooked]


def bk_backward_inputs() -> list[torch.Tensor]:
    """Extra `inputs=` for a backward that a custom autograd Function runs inside its own backward.

    A reversible block recomputes its layers during backward and back-propagates through them with
    `torch.autograd.grad`. While a BK pass is running, it must add these anchors to that call's
    inputs (so the taps of the recomputed layers fire) and may skip parameter gradients, which BK
    forms itself. Empty outside a BK pass.
    """
    return list(_TAPPING.values())


@dataclass
class _LayerCall:
    """One forward call of a trainable layer: its input until the output gradient arrives."""

    path: str
    module: nn.Module
    handler: object
    a: torch.Tensor | None
    pending: bool = True


@dataclass
class _ParamBook:
    """What one example-batch contributed to one parameter, across all calls that used it."""

    instantiated: torch.Tensor | None = None  # (B, *shape), summed over calls
    factored: list[Factored] = field(default_factory=list)
    squared_norm: torch.Tensor | None = None  # two-pass mode: reduced at once

    def kept_squared_norm(self) -> torch.Tensor | None:
        """Σ over calls of the kept contributions, squared per example (cross terms of reused weights
        included); None when nothing is kept."""
        squared = None
        if self.instantiated is not None:
            if self.factored:
                raise RuntimeError("BKEngine: a parameter has both instantiated and factored uses")
            pe = self.instantiated
            squared = pe.to(norm_dtype(pe.dtype)).flatten(1).pow(2).sum(1)
        for i, u in enumerate(self.factored):
            term = factored_inner(u, u) + sum((2 * factored_inner(u, v) for v in self.factored[i + 1:]), 0)
            squared = term if squared is None else squared + term
        return squared


class _Tap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, output: torch.Tensor, anchor: torch.Tensor, on_grad) -> torch.Tensor:
        ctx.on_grad = on_grad
        ctx.anchor_meta = (anchor.dtype, anchor.device)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.on_grad(grad)
        dtype, device = ctx.anchor_meta
        return grad, torch.zeros((), dtype=dtype, device=device), None


class BKEngine:
    """Per-example clipping by book-keeping for every trainable parameter of `model`.

    `clipped_backward(per_example_loss)` adds Σ_i c_i ∇L_i to each trainable parameter's `.grad`
    (c_i = min(1, C/‖∇L_i‖) for "abadi", C/(‖∇L_i‖+γ) for "automatic") and returns ‖∇L_i‖.
    `backward_passes=2` trades a second backward for memory: the first pass reduces each layer's
    contribution to per-example squared norms at once (nothing kept per layer), the second
    back-propagates Σ_i c_i L_i. That keeps BK buffers O(1) in depth, which reversible networks need.
    `backward_passes="auto"` keeps the buffers as one pass does while they stay within
    `KEEP_BUDGET_TENSORS` of the pass's largest activation tensors, and only when they outgrow it
    reduces what it kept to squared norms and finishes as two passes: one pass whenever the trainable
    part is small enough (per-example gradients of LoRA r=1 are tiny), memory O(1) in depth always.
    It retains the forward graph through the first pass (as two passes do), so it suits models whose
    forward keeps little (reversible stacks); `last_backward_passes` says what the last step ran.

    `clip_groups` (group-wise clipping, McMahan et al. 2018; He et al. 2023): K lists of parameters that
    partition the trainable ones; each example's gradient is clipped per group to C/√K, so its whole
    clipped gradient still has norm ≤ C and the noise σ·C keeps the same guarantee. It gives each group a
    share of the budget of its own (a classifier head is not crowded out by a large trainable body). With
    two backward passes, each group beyond the first costs one more replayed backward.
    `last_clipped` [B]: which examples the last step scaled down in some group (norm above its bound).
    """

    def __init__(self, model: nn.Module, max_grad_norm: float = 1.0, clipping_mode: str = "mixed",
                 clip_fn: str = "abadi", gamma: float = AUTOMATIC_GAMMA, backward_passes: int = 1,
                 clip_groups: Sequence[Sequence[torch.Tensor]] | None = None) -> None:
        if not (isinstance(max_grad_norm, (int, float)) and 0 < max_grad_norm < float("inf")):
            raise ValueError(f"max_grad_norm must be a finite number > 0, got {max_grad_norm!r}")
        if clipping_mode not in CLIPPING_MODES:
            raise ValueError(f"clipping_mode must be one of {CLIPPING_MODES}, got {clipping_mode!r}")
        if clip_fn not in CLIP_FNS:
            raise ValueError(f"clip_fn must be one of {CLIP_FNS}, got {clip_fn!r}")
        if not (isinstance(gamma, (int, float)) and 0 < gamma < float("inf")):
            raise ValueError(f"gamma must be a finite number > 0, got {gamma!r}")
        if isinstance(backward_passes, bool) or backward_passes not in BACKWARD_PASSES:  # True == 1 otherwise
            raise ValueError(f"backward_passes must be 1, 2 or 'auto', got {backward_passes!r}")
        self.model = model
        self.max_grad_norm = float(max_grad_norm)
        self.clipping_mode = clipping_mode
        self.clip_fn = clip_fn
        self.gamma = float(gamma)
        self.backward_passes = backward_passes
        self.last_backward_passes: int | None = None  # what the last clipped_backward ran (1 or 2)
        self.params = list({id(p): p for p in model.parameters() if p.requires_grad}.values())
        if not self.params:
            raise ValueError("BKEngine: the model has no parameter with requires_grad=True")
        self._groups = self._check_groups(clip_groups)
        self._group_of = {id(p): k for k, group in enumerate(self._groups) for p in group}
        self.last_clipped: torch.Tensor | None = None
        self._anchor = torch.zeros((), requires_grad=True)
        self._calls: list[_LayerCall] = []
        self._books: dict[int, _ParamBook] = {}
        # "keep" (one-pass BK), "reduce" (first of two passes), "replay" (second of two passes: layers
        # recomputed in it are not booked) or "idle"
        self._phase = "idle"
        self._budgeted = False  # "auto": "keep" reverts to "reduce" when the kept bytes outgrow the budget
        self._kept_bytes = 0
        self._largest_bytes = 0
        self._batch_size: int | None = None
        self.tap_backward_calls = 0  # layer-output gradients seen: one per layer call per backward pass
        self._ghost = GhostRule(clipping_mode, set())
        self._hooked: set[int] = set()
        self._static_shared = self._attach()
        _ATTACHED.add(self)

    def _check_groups(self, clip_groups: Sequence[Sequence[torch.Tensor]] | None) -> list[list[torch.Tensor]]:
        if clip_groups is None:
            return [self.params]
        groups = [list(group) for group in clip_groups]
        seen: dict[int, int] = {}
        for k, group in enumerate(groups):
            if not group:
                raise ValueError(f"clip_groups[{k}] is empty; every group needs at least one parameter")
            for p in group:
                if id(p) in seen:
                    raise ValueError(f"clip_groups: a parameter is in groups {seen[id(p)]} and {k}; each "
                                     "trainable parameter belongs to exactly one group")
                seen[id(p)] = k
        trainable = {id(p) for p in self.params}
        if set(seen) != trainable:
            raise ValueError(f"clip_groups must partition the model's trainable parameters: "
                             f"{len(trainable - set(seen))} trainable left out, {len(set(seen) - trainable)} "
                             "not trainable in this model")
        return groups

    # ---- hooks -----------------------------------------------------------------------------

    def _attach(self) -> set[int]:
        owners: dict[int, int] = defaultdict(int)
        self._handles = [self.model.register_forward_pre_hook(self._on_model_call, with_kwargs=True)]
        for path, module in self.model.named_modules():
            own = {n: p for n, p in module._parameters.items() if p is not None and p.requires_grad}
            if not own:
                continue
            handler = handler_for(module)
            unhandled = sorted(set(own) - set(handler.param_names)) if handler else sorted(own)
            if unhandled:
                raise TypeError(
                    f"BKEngine: module '{path}' of type {type(module).__module__}.{type(module).__qualname__} "
                    f"has trainable parameters {unhandled} with no per-example gradient rule. "
                    f"Supported: {SUPPORTED}. Freeze them (requires_grad=False) or use a supported layer.")
            handler.check(module, path)
            self._hooked.add(id(module))
            for p in own.values():
                owners[id(p)] += 1
            self._handles.append(module.register_forward_hook(partial(self._on_layer_call, path, handler)))
        return {pid for pid, n in owners.items() if n > 1}

    def detach(self) -> None:
        """Remove every hook; the model behaves as before the engine was attached."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._hooked = set()
        _ATTACHED.discard(self)

    def _on_model_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not torch.is_grad_enabled():
            return
        self._calls = []
        self._batch_size = None
        candidates = [kwargs.get(k) for k in BATCH_KEYS] + list(args)
        for value in candidates:
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                self._batch_size = value.shape[0]
                break

    def _on_layer_call(self, path: str, handler, module: nn.Module, args: tuple, output: torch.Tensor):
        if not torch.is_grad_enabled() or self._phase == "replay":
            return None
        a = handler.layer_input(module, args)  # None when the layer's rule needs only g
        batch = self._batch_size
        if batch is not None and batch > 1 and output.shape[0] == 1:
            # HF builds position ids with batch size 1 and broadcasts them: expand, so the gradient
            # that reaches this layer is per example instead of already summed over the batch.
            a = None if a is None else a.expand(batch, *a.shape[1:])
            output = output.expand(batch, *output.shape[1:])
        call = _LayerCall(path, module, handler, None if a is None else a.detach())
        self._calls.append(call)
        return _Tap.apply(output, self._anchor, partial(self._on_grad, call))

    def _on_grad(self, call: _LayerCall, g: torch.Tensor) -> None:
        self.tap_backward_calls += 1
        if self._phase not in ("keep", "reduce") or not call.pending:
            return
        if self._budgeted:
            self._largest_bytes = max(self._largest_bytes, g.nbytes, 0 if call.a is None else call.a.nbytes)
        for param, contribution in call.handler.contributions(call.module, call.a, g.detach(), self._ghost):
            self._book(param, contribution)
        call.a = None  # the layer's BK buffer ends here unless the contribution kept it (factored)
        call.pending = False
        if self._budgeted and self._kept_bytes > KEEP_BUDGET_TENSORS * self._largest_bytes:
            self._reduce_kept()

    def _reduce_kept(self) -> None:
        """Over budget: turn what single-use parameters kept into squared norms and go on as the first of
        two passes (reused weights keep theirs: their cross terms need every use)."""
        for pid, book in self._books.items():
            if pid in self._ghost.shared:
                continue
            squared = book.kept_squared_norm()
            if squared is not None:
                book.squared_norm = squared if book.squared_norm is None else book.squared_norm + squared
                book.instantiated, book.factored = None, []
        self._phase, self._budgeted = "reduce", False

    def _book(self, param: torch.Tensor, contribution: object) -> None:
        book = self._books.setdefault(id(param), _ParamBook())
        if self._phase == "reduce" and id(param) not in self._ghost.shared:
            # Used once: its squared norm is all the first pass needs, so nothing per layer is kept.
            if isinstance(contribution, Instantiated):
                sq = contribution.per_example.to(norm_dtype(contribution.per_example.dtype)).flatten(1).pow(2).sum(1)
            else:
                sq = factored_inner(contribution, contribution)
            book.squared_norm = sq if book.squared_norm is None else book.squared_norm + sq
        elif isinstance(contribution, Instantiated):
            pe = contribution.per_example
            if book.instantiated is None:
                self._kept_bytes += pe.nbytes
            book.instantiated = pe if book.instantiated is None else book.instantiated + pe
        else:
            self._kept_bytes += contribution.right.nbytes + (0 if contribution.left is None else
                                                              contribution.left.nbytes)
            book.factored.append(contribution)

    # ---- the clipped backward --------------------------------------------------------------

    def clipped_backward(self, per_example_loss: torch.Tensor, loss_scale: float = 1.0) -> torch.Tensor:
        """Add the clipped per-example gradient sum to `.grad`; return the unclipped norms [B].

        `loss_scale` S (fp16 loss scaling, `precision.LossScaler`): the backward runs on S·L so that fp16
        gradients do not underflow; the norms are divided by S before clipping (the returned norms are the
        true ones), an example whose norm is not finite (its scaled gradient overflowed) gets factor 0 and
        contributes nothing, and `.grad` receives S times the clipped sum, for the caller to unscale.
        """
        if per_example_loss.dim() != 1:
            raise ValueError(f"per_example_loss must be 1-D [batch], got shape {tuple(per_example_loss.shape)}")
        if not (isinstance(loss_scale, (int, float)) and 0 < loss_scale < float("inf")):
            raise ValueError(f"loss_scale must be a finite number > 0, got {loss_scale!r}")
        batch = per_example_loss.shape[0]
        if self._batch_size is not None and batch != self._batch_size:
            raise ValueError(f"per_example_loss has {batch} entries but the forward pass saw batch size "
                             f"{self._batch_size}")
        if batch == 0:
            self._reset()
            return per_example_loss.detach().new_zeros(0, dtype=norm_dtype(per_example_loss.dtype))
        if not per_example_loss.requires_grad:
            raise ValueError("per_example_loss does not depend on any trainable parameter (no grad_fn); "
                             "was the forward run under torch.no_grad()?")
        self._ghost.shared = self._static_shared | self._called_twice()
        scaled = per_example_loss * loss_scale if loss_scale != 1.0 else per_example_loss
        try:
            _TAPPING[id(self._anchor)] = self._anchor
            self._phase = "reduce" if self.backward_passes == 2 else "keep"
            self._budgeted = self.backward_passes == "auto"
            torch.autograd.grad(scaled.sum(), [self._anchor], allow_unused=True,
                                retain_graph=self.backward_passes != 1)
            group_norms = self._group_norms(batch, per_example_loss) / loss_scale  # [K, B]
            factors = self._clip_factors(group_norms, loss_scale != 1.0)
            self.last_clipped = (group_norms > self._group_bound).any(0)
            if self._phase == "keep":
                self.last_backward_passes = 1
                self._add_clipped_sums(factors, keep=None if loss_scale == 1.0 else (factors > 0).all(0))
            else:
                self.last_backward_passes = 2
                self._phase = "replay"
                _TAPPING.pop(id(self._anchor))
                factors = factors.to(per_example_loss.dtype).detach()
                for k, group in enumerate(self._groups):
                    torch.autograd.backward((scaled * factors[k]).sum(), inputs=group,
                                            retain_graph=k + 1 < len(self._groups))
            # one group: its norms as they are (no square-and-root round trip)
            norms = group_norms[0] if len(self._groups) == 1 else group_norms.pow(2).sum(0).sqrt()
        finally:
            _TAPPING.pop(id(self._anchor), None)
            self._reset()
        return norms.detach()

    def _called_twice(self) -> set[int]:
        counts: dict[int, int] = defaultdict(int)
        for call in self._calls:
            for p in call.module._parameters.values():
                if p is not None and p.requires_grad:
                    counts[id(p)] += 1
        return {pid for pid, n in counts.items() if n > 1}

    def _reset(self) -> None:
        self._phase = "idle"
        self._budgeted = False
        self._kept_bytes = self._largest_bytes = 0
        self._calls = []
        self._books = {}
        self._batch_size = None

    @property
    def _group_bound(self) -> float:
        """Each group's clipping bound C/√K: K groups at this bound make one gradient of norm ≤ C."""
        return self.max_grad_norm / math.sqrt(len(self._groups))

    def _group_norms(self, batch: int, like: torch.Tensor) -> torch.Tensor:
        """Per-example gradient norms of each clipping group, [K, B]."""
        # Start in fp32 and let type promotion widen to the contributions' dtype (float64 stays float64).
        squared = [torch.zeros(batch, dtype=norm_dtype(like.dtype), device=like.device) for _ in self._groups]
        for pid, book in self._books.items():
            k = self._group_of[pid]
            kept = book.kept_squared_norm()
            if kept is not None:
                squared[k] = squared[k] + kept
            if book.squared_norm is not None:
                squared[k] = squared[k] + book.squared_norm
        return torch.stack(squared).clamp(min=0).sqrt()

    def _clip_factors(self, norms: torch.Tensor, drop_non_finite: bool = False) -> torch.Tensor:
        factors = clip_factors(norms, self._group_bound, self.clip_fn, self.gamma)
        if drop_non_finite:  # an overflowed example contributes 0 (still of norm <= C: sensitivity unchanged)
            # in every group: an overflow in one group makes the example's other norms untrustworthy too
            finite = torch.isfinite(norms).all(0)
            factors = torch.where(finite, factors, torch.zeros_like(factors))
        return factors

    def _add_clipped_sums(self, factors: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """`factors` [K, B], one row per clipping group. `keep` [B] (loss scaling): rows of examples not kept
        are zeroed first, since 0 · inf is NaN."""
        by_id = {id(p): p for p in self.params}
        for pid, book in self._books.items():
            param = by_id[pid]
            group_factors = factors[self._group_of[pid]]
            total = None
            if book.instantiated is not None:
                total = instantiated_clipped_sum(_rows(book.instantiated, keep), group_factors)
            # Dense uses first, so that one-hot uses (embeddings) scatter into their sum in place.
            for f in sorted(book.factored, key=lambda f: f.left is None):
                if keep is not None:
                    f = Factored(right=_rows(f.right, keep), left=None if f.left is None else _rows(f.left, keep),
                                 left_ids=f.left_ids)
                total = factored_clipped_sum(f, group_factors, param.shape, out=total)
            total = total.to(param.dtype)
            if param.grad is None:
                param.grad = total
            else:
                param.grad.add_(total)


def _rows(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """`x` [B, ...] with the rows of examples not in `keep` set to zero (no host sync)."""
    if keep is None:
        return x
    return torch.where(keep.view(-1, *[1] * (x.dim() - 1)), x, torch.zeros((), dtype=x.dtype, device=x.device))
