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

Backward by replay, never by inversion. Inverting a block from its output, x² = (y² − G(y¹))/β,
x¹ = (y¹ − F(x²))/λ, multiplies round-off by about 1/(λβ) per block near the start point, in any
precision, so nothing here divides by λ or β. Instead:
- The forward runs without a graph and keeps the stream pair (x¹, x²) at the input of the first
  block of every segment of `segment_size` blocks (default about √L), the top block's y¹, and, in
  training mode, the random state before each sub-layer call.
- The backward goes down segment by segment. It replays the segment's forward from its stored pair
  without a graph (under the forward's autocast setting and random states: the same dropout masks,
  the same DyLoRA ranks), keeping each block's x² and y¹: the very tensors the forward computed.
  Then, from the segment's top block down, it recomputes G at y¹ and F at x² with a graph,
  back-propagates through them and frees them.
Gradients are therefore plain autograd's on the same forward values; only the order of the
floating-point sums differs. Live hidden-state tensors at the peak: 2 per stored pair (all kept
until the graph is freed: two-pass BK back-propagates twice) plus 2 per block of the segment being
back-propagated, about 4·√L at the default, plus one sub-layer's graph. Time: each backward pass
re-runs every block that does not start a segment once more (L − ⌈L/k⌉ block forwards).
Measured errors, memory and step times: BENCHMARKS.md ("Reversible network").
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import nn

from dpmemarc_core.models import KV_CACHE_ARGUMENTS
from dpmemarc_core.privacy.engine import bk_anchors_of, bk_backward_inputs

Sublayer = Callable[[nn.Module, torch.Tensor, dict], torch.Tensor]  # (block, input, call arguments) -> output
# Entered around each sub-layer call of a coupling (0: F, 1: G): records or replays its random state.
Randomness = Callable[[int], AbstractContextManager]


class ReversibleStack(nn.Module):
    """All backbone blocks as one reversible coupling stack, called like one of the original blocks.

    It replaces the backbone's block list (as the list's only element), so the Hugging Face forward
    around it — embeddings, masks, rotary tables, final norm, head, loss — stays the library's own.
    `reversible=False` runs the same couplings with ordinary autograd (activations kept per block):
    the reference the replayed backward is tested against, and the faster choice when memory allows.
    `segment_size` k: blocks per replayed segment (None: `default_segment_size`, about √L, which minimises
    the stored plus the replayed streams); k=1 stores every block's input pair and replays nothing.
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
            return _ReplayedStackFunction.apply(self, call, len(params), hidden_states, *params, *anchors)
        x1 = x2 = hidden_states
        for block in self.blocks:
            x1, x2 = self.couple(block, x1, x2, call)
        return x2

    def segment_starts(self) -> list[int]:
        """First block of each replayed segment: the blocks whose input stream pairs the forward stores."""
        return list(range(0, len(self.blocks), self.segment_size or default_segment_size(len(self.blocks))))

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
               randomness: Randomness | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One block forward: (x¹, x²) → (y¹, y²). `randomness(s)` is entered around F (s=0) and G (s=1)."""
        randomness = randomness or _no_randomness
        with randomness(0):
            y1 = self.x1_factor * x1 + self.f(block, x2, call)
        with randomness(1):
            y2 = self.x2_factor * x2 + self.g(block, y1, call)
        return y1, y2

    def replay(self, start: int, end: int, x1: torch.Tensor, x2: torch.Tensor, top_y1: torch.Tensor, call: dict,
               randomness: Callable[[int], Randomness] | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(x², y¹) of each block start..end−1, re-running the segment's forward without a graph from its
        stored input pair (x¹, x²); `top_y1` is block end−1's y¹ (stored above), so that block is not re-run."""
        points = []
        with torch.no_grad():
            for index in range(start, end - 1):
                y1, y2 = self.couple(self.blocks[index], x1, x2, call, randomness and randomness(index))
                points.append((x2, y1))
                x1, x2 = y1, y2
        points.append((x2, top_y1))
        return points

    def backward_step(self, block: nn.Module, x2: torch.Tensor, y1: torch.Tensor, dy1: torch.Tensor,
                      dy2: torch.Tensor, call: dict, params: list[torch.Tensor], anchors: list[torch.Tensor],
                      randomness: Randomness | None) -> tuple[torch.Tensor, ...]:
        """Back-propagate (dy¹, dy²) through one block whose forward read x² and produced y¹.

        Returns (dx1, dx2, *param_grads) with param_grads aligned with `params`. `anchors` (BK taps) are
        added to both recomputations' inputs so the engine sees every layer's a and g.
        """
        randomness = randomness or _no_randomness
        with randomness(1), torch.enable_grad():
            y1 = y1.detach().requires_grad_()
            g = self.g(block, y1, call)
        dy1_from_g, *grads_g = torch.autograd.grad(g, [y1, *params, *anchors], dy2, allow_unused=True)
        # Nothing below needs G's graph, y¹ or the separate gradient parts: dropped before F's recompute, which
        # is where the step's memory peaks. dy¹ is this backward's own tensor (zeros or the block above's λ·dy¹).
        del g, y1
        dy1 = dy1.add_(dy1_from_g)
        del dy1_from_g
        with randomness(0), torch.enable_grad():
            x2 = x2.detach().requires_grad_()
            f = self.f(block, x2, call)
        dx2_from_f, *grads_f = torch.autograd.grad(f, [x2, *params, *anchors], dy1, allow_unused=True)
        del f, x2
        dx1 = self.x1_factor * dy1
        dx2 = dx2_from_f.add_(dy2, alpha=self.x2_factor)
        param_grads = [_add(a, b) for a, b in zip(grads_g[:len(params)], grads_f[:len(params)])]
        return (dx1, dx2, *param_grads)


def default_segment_size(layers: int) -> int:
    """The k with the fewest live streams, 2·⌈L/k⌉ stored plus 2·(k − 1) replayed (about √L); of equal ones
    the smallest, which replays the fewest blocks (L − ⌈L/k⌉ per backward pass)."""
    return min(range(1, layers + 1), key=lambda k: (math.ceil(layers / k) + k, k))


class _ReplayedStackFunction(torch.autograd.Function):
    """Forward without a graph, keeping one stream pair per segment; backward by segment replay.

    Inputs after the hidden states: the stack's trainable parameters (their gradients come out of the
    recomputations when autograd asks for them) and the anchors of BK engines attached to the stack
    (so that a BK pass, which asks only for its anchor, reaches this node at all).
    """

    @staticmethod
    def forward(ctx, stack: ReversibleStack, call: dict, n_params: int, hidden: torch.Tensor,
                *tracked: torch.Tensor) -> torch.Tensor:
        ctx.stack, ctx.call, ctx.params = stack, call, tracked[:n_params]
        ctx.autocast = _autocast_state(hidden.device)
        ctx.random_states = _RandomStates(hidden.device) if stack.training else None
        record = ctx.random_states.record if ctx.random_states else None
        ctx.starts = stack.segment_starts()
        starts, stored = set(ctx.starts), []
        x1 = x2 = hidden
        for index, block in enumerate(stack.blocks):
            if index in starts:
                stored += [x1, x2]
            x1, x2 = stack.couple(block, x1, x2, call, record)
        ctx.save_for_backward(x1, *stored)
        return x2

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        stack, call, blocks = ctx.stack, ctx.call, list(ctx.stack.blocks)
        top_y1, *stored = ctx.saved_tensors
        replay = ctx.random_states.replay if ctx.random_states else None
        anchors = bk_backward_inputs()
        # BK forms parameter gradients itself from the taps; outside a BK pass autograd wants them here.
        wanted = set() if anchors else {id(p) for p in ctx.params}
        grads: dict[int, torch.Tensor] = {}
        dy1, dy2 = torch.zeros_like(top_y1), grad_output
        ends = ctx.starts[1:] + [len(blocks)]
        for segment in reversed(range(len(ctx.starts))):
            start, end = ctx.starts[segment], ends[segment]
            x1, x2 = stored[2 * segment], stored[2 * segment + 1]
            with _autocast(ctx.autocast):
                points = stack.replay(start, end, x1, x2, top_y1, call, replay)
            for index in reversed(range(start, end)):
                block = blocks[index]
                own = [p for p in block.parameters() if id(p) in wanted]
                # One autocast region per block: autocast caches its low-precision cast of every leaf that
                # requires grad (the detached x² and y¹ are) until the region ends. The block's (x², y¹) is
                # popped, not kept: the segment's replayed streams are freed as the backward goes down.
                with _autocast(ctx.autocast):
                    dy1, dy2, *own_grads = stack.backward_step(block, *points.pop(), dy1, dy2, call, own, anchors,
                                                               replay and replay(index))
                grads.update({id(p): gr for p, gr in zip(own, own_grads)})
            top_y1 = x1  # the segment's input x¹ is the y¹ of the block below it
        d_hidden = dy1 + dy2 if ctx.needs_input_grad[3] else None
        n_anchors = len(ctx.needs_input_grad) - 4 - len(ctx.params)
        return (None, None, None, d_hidden, *(grads.get(id(p)) for p in ctx.params), *([None] * n_anchors))


class _RandomStates:
    """The random state before every sub-layer call of one training forward (two per block, in order), so
    that a replay or a recomputation draws the same dropout masks and DyLoRA ranks as the forward did."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.states: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    @contextmanager
    def record(self, sublayer: int) -> Iterator[None]:
        self.states.append(_rng_state(self.device))
        yield

    def replay(self, block: int) -> Randomness:
        return lambda sublayer: _replayed_rng(self.states[2 * block + sublayer], self.device)


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


def _no_randomness(sublayer: int) -> AbstractContextManager:
    return nullcontext()


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


@contextmanager
def _replayed_rng(state: tuple, device: torch.device) -> Iterator[None]:
    """Run with the random state a forward sub-layer saw (same dropout masks), restoring ours afterwards."""
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
    # Backward runs outside the caller's autocast region: replay and recompute under the forward's setting.
    if state is None:
        return nullcontext()
    device_type, enabled, dtype = state
    return torch.autocast(device_type, dtype=dtype, enabled=enabled)
