"""The reversible two-stream stack (after MEFT, Liao et al. 2023) and its memory-lean backward.

Every backbone block becomes one coupling, with F and G the block's own two sub-layers:

    y¹ = λ·x¹ + F(x²),   F(x) = attn_sublayer(x) − λ·x
    y² = β·x² + G(y¹),   G(y) = mlp_sublayer(y) − β·y

`attn_sublayer` / `mlp_sublayer` are the pretrained sub-layers with their residual path (and BERT's
post-norm) included, so that with x¹ = x² the coupling reproduces the pretrained block exactly. The
−λ·x, −β·y terms hand λ and β of each sub-layer's residual to the coupling's skip terms: the step-0
error is then λ·(x¹ − x²) and β·(x² − y¹), a sub-layer update's size instead of the whole residual
stream's (MEFT's F, G keep the full residual, which on pre-norm models adds λ·h and β·h per block).
Both streams start as the embedding output; the stack returns the second stream, which tracks the
pretrained hidden state (MEFT averages the streams; here the first stream tracks the mid-block
state, so an average would halve the last MLP update).

Backward never keeps per-block activations: it inverts each block from its output,
x² = (y² − G(y¹))/β, x¹ = (y¹ − F(x²))/λ, recomputing G and F with grad enabled on the recovered
tensors. Inverting divides by λ and β, so round-off grows by at least 1/(λβ) per block going down;
`segment_size` stores the streams every few blocks and restarts the inversion there (numbers in
`reversible.apply_rev`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from dpmemarc_core.models import KV_CACHE_ARGUMENTS
from dpmemarc_core.privacy.engine import bk_anchors_of, bk_backward_inputs

Sublayer = Callable[[nn.Module, torch.Tensor, dict], torch.Tensor]  # (block, input, call arguments) -> output


class ReversibleStack(nn.Module):
    """All backbone blocks as one reversible coupling stack, called like one of the original blocks.

    It replaces the backbone's block list (as the list's only element), so the Hugging Face forward
    around it — embeddings, masks, rotary tables, final norm, head, loss — stays the library's own.
    `reversible=False` runs the same couplings with ordinary autograd (activations kept per block):
    the reference the reversible backward is tested against, and the faster choice when memory allows.
    """

    def __init__(self, blocks: nn.ModuleList, attention: Sublayer, mlp: Sublayer,
                 x1_factor: float, x2_factor: float, segment_size: int | None = None) -> None:
        super().__init__()
        self.blocks = blocks
        self.attention = attention
        self.mlp = mlp
        self.x1_factor = float(x1_factor)
        self.x2_factor = float(x2_factor)
        self.reversible = True
        self.segment_size = segment_size
        self._signature = inspect.signature(type(blocks[0]).forward)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        call = self._bind(hidden_states, args, kwargs)
        if self.reversible and torch.is_grad_enabled():
            call = _without_cache(call)
            params = [p for p in self.blocks.parameters() if p.requires_grad]
            anchors = bk_anchors_of(self)
            return _ReversibleStackFunction.apply(self, call, len(params), hidden_states, *params, *anchors)
        x1 = x2 = hidden_states
        for block in self.blocks:
            x1, x2 = self.couple(block, x1, x2, call)
        return x2

    def segment_starts(self) -> list[int]:
        """Blocks whose input streams are stored (every `segment_size`-th block after the first)."""
        if self.segment_size is None:
            return []
        return list(range(self.segment_size, len(self.blocks), self.segment_size))

    def _bind(self, hidden_states: torch.Tensor, args: tuple, kwargs: dict) -> dict:
        bound = self._signature.bind(None, hidden_states, *args, **kwargs)
        bound.apply_defaults()
        call = dict(bound.arguments)
        for own in list(self._signature.parameters)[:2]:  # self, hidden_states
            call.pop(own)
        if call.get("encoder_hidden_states") is not None:
            raise ValueError("rev: cross-attention (encoder_hidden_states) is not supported by the reversible stack")
        return call

    def f(self, block: nn.Module, x2: torch.Tensor, call: dict) -> torch.Tensor:
        return self.attention(block, x2, call) - self.x1_factor * x2

    def g(self, block: nn.Module, y1: torch.Tensor, call: dict) -> torch.Tensor:
        return self.mlp(block, y1, call) - self.x2_factor * y1

    def couple(self, block: nn.Module, x1: torch.Tensor, x2: torch.Tensor, call: dict,
               rng: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One block forward; with `rng` a list, the random state before F and before G is appended."""
        if rng is not None:
            rng.append(_rng_state(x2.device))
        y1 = self.x1_factor * x1 + self.f(block, x2, call)
        if rng is not None:
            rng.append(_rng_state(x2.device))
        y2 = self.x2_factor * x2 + self.g(block, y1, call)
        return y1, y2

    def backward_step(self, block: nn.Module, y1: torch.Tensor, y2: torch.Tensor, dy1: torch.Tensor,
                      dy2: torch.Tensor, call: dict, params: list[torch.Tensor], anchors: list[torch.Tensor],
                      rng: tuple | None) -> tuple[torch.Tensor, ...]:
        """Invert one block and back-propagate through it.

        Returns (x1, x2, dx1, dx2, *param_grads) with param_grads aligned with `params`. `anchors`
        (BK taps) are added to both recomputations' inputs so the engine sees every layer's a and g.
        """
        with _replayed_rng(rng[1] if rng else None, y1.device), torch.enable_grad():
            y1 = y1.detach().requires_grad_()
            g = self.g(block, y1, call)
        grads_g = torch.autograd.grad(g, [y1, *params, *anchors], dy2, allow_unused=True)
        with torch.no_grad():
            x2 = (y2 - g) / self.x2_factor
        del g
        dy1 = dy1 + grads_g[0]
        with _replayed_rng(rng[0] if rng else None, y1.device), torch.enable_grad():
            x2 = x2.requires_grad_()
            f = self.f(block, x2, call)
        grads_f = torch.autograd.grad(f, [x2, *params, *anchors], dy1, allow_unused=True)
        with torch.no_grad():
            x1 = (y1 - f) / self.x1_factor
        dx1 = self.x1_factor * dy1
        dx2 = self.x2_factor * dy2 + grads_f[0]
        param_grads = [_add(a, b) for a, b in zip(grads_g[1:1 + len(params)], grads_f[1:1 + len(params)])]
        return (x1, x2.detach(), dx1, dx2, *param_grads)


class _ReversibleStackFunction(torch.autograd.Function):
    """Forward without a graph, keeping only the last block's two streams; backward by inversion.

    Inputs after the hidden states: the stack's trainable parameters (their gradients come out of the
    recomputations when autograd asks for them) and the anchors of BK engines attached to the stack
    (so that a BK pass, which asks only for its anchor, reaches this node at all).
    """

    @staticmethod
    def forward(ctx, stack: ReversibleStack, call: dict, n_params: int, hidden: torch.Tensor,
                *tracked: torch.Tensor) -> torch.Tensor:
        ctx.stack, ctx.call, ctx.params = stack, call, tracked[:n_params]
        ctx.autocast = _autocast_state(hidden.device)
        rng = [] if stack.training else None
        x1 = x2 = hidden
        ctx.starts, boundaries = stack.segment_starts(), []
        for index, block in enumerate(stack.blocks):
            if index in ctx.starts:
                boundaries += [x1, x2]
            x1, x2 = stack.couple(block, x1, x2, call, rng)
        ctx.rng = rng
        ctx.save_for_backward(x1, x2, *boundaries)
        return x2

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        stack, call = ctx.stack, ctx.call
        y1, y2, *boundaries = ctx.saved_tensors
        exact = dict(zip(ctx.starts, zip(boundaries[::2], boundaries[1::2])))
        dy1, dy2 = torch.zeros_like(y1), grad_output
        anchors = bk_backward_inputs()
        # BK forms parameter gradients itself from the taps; outside a BK pass autograd wants them here.
        wanted = set() if anchors else {id(p) for p in ctx.params}
        grads: dict[int, torch.Tensor] = {}
        blocks = list(stack.blocks)
        for index in reversed(range(len(blocks))):
            block = blocks[index]
            own = [p for p in block.parameters() if id(p) in wanted]
            rng = tuple(ctx.rng[2 * index:2 * index + 2]) if ctx.rng is not None else None
            # One autocast region per block: autocast caches its low-precision cast of every tensor that
            # requires grad (the recovered streams are) until the region ends, which over the whole stack
            # kept a copy of every block's streams alive to the end of the backward.
            with _autocast(ctx.autocast):
                y1, y2, dy1, dy2, *own_grads = stack.backward_step(block, y1, y2, dy1, dy2, call, own, anchors, rng)
            grads.update({id(p): gr for p, gr in zip(own, own_grads)})
            y1, y2 = exact.get(index, (y1, y2))  # a segment boundary: restart from the stored streams
        d_hidden = dy1 + dy2 if ctx.needs_input_grad[3] else None
        n_anchors = len(ctx.needs_input_grad) - 4 - len(ctx.params)
        return (None, None, None, d_hidden, *(grads.get(id(p)) for p in ctx.params), *([None] * n_anchors))


def cache_argument(call: dict) -> dict:
    """The KV-cache keyword argument of `call` under the installed transformers' name, for a sub-layer call
    (a call dict is bound from the installed block's signature, so it holds exactly one of the names)."""
    return {name: call[name] for name in KV_CACHE_ARGUMENTS if name in call}


def _without_cache(call: dict) -> dict:
    # The backward recomputes every attention call; a KV cache would grow again on each of them.
    (name, cache), = cache_argument(call).items()
    if cache is not None and cache.get_seq_length() > 0:
        raise ValueError("rev: training through the reversible stack with a non-empty KV cache (past_key_values) "
                         "is not supported")
    call = {**call, name: None}
    if "use_cache" in call:
        call["use_cache"] = False
    return call


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


@contextmanager
def _replayed_rng(state: tuple | None, device: torch.device) -> Iterator[None]:
    """Run with the random state a forward sub-layer saw (same dropout masks), restoring ours afterwards."""
    if state is None:
        yield
        return
    cpu, cuda = state
    with torch.random.fork_rng(devices=[device] if cuda is not None else []):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        yield


def _autocast_state(device: torch.device) -> tuple[str, bool, torch.dtype] | None:
    if not torch.amp.is_autocast_available(device.type):
        return None
    return device.type, torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type)


def _autocast(state: tuple[str, bool, torch.dtype] | None):
    # Backward runs outside the caller's autocast region: recompute under the forward's setting.
    if state is None:
        return nullcontext()
    device_type, enabled, dtype = state
    return torch.autocast(device_type, dtype=dtype, enabled=enabled)
