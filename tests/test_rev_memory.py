"""`rev`'s memory: live bytes of the replayed backward grow like √depth, and the meta simulation sees the
recomputation the way a GPU runs it (fused attention inside the custom backward too)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from dpmemarc_core.losses import per_example_loss
from dpmemarc_core.memory.emulation import FusedAttention
from dpmemarc_core.memory.tracker import StorageTracker
from dpmemarc_core.methods.rev.stack import apply_rev

BATCH, SEQ, WIDTH = 8, 64, 64


def step_peak(layers: int, segment_size: int | None) -> int:
    """Peak bytes a forward + backward adds over the weights (CPU tensors, counted by the simulator's tracker)."""
    torch.manual_seed(0)
    config = GPT2Config(n_layer=layers, n_embd=WIDTH, n_head=2, vocab_size=32, n_positions=SEQ, bos_token_id=0,
                        eos_token_id=0)
    model = apply_rev(GPT2LMHeadModel(config), r=2, segment_size=segment_size)
    ids = torch.randint(0, 32, (BATCH, SEQ))
    tracker = StorageTracker("cpu")
    tracker.register(list(model.parameters()) + list(model.buffers()), "weights")
    with tracker:
        per_example_loss(model(input_ids=ids).logits, ids).sum().backward()
    report = tracker.report()
    return report.peak_bytes - report.baseline_bytes


def test_peak_grows_like_the_square_root_of_the_depth():
    # Default segments of about √L blocks: ~4·√L streams, so 4 → 16 → 64 blocks adds 8 then 16 streams (×2);
    # storing every block (segment_size=1) adds 24 then 96 (×4). The depth-independent part cancels.
    stream = BATCH * SEQ * WIDTH * 4
    for segment_size, low, high in ((None, 1.6, 2.5), (1, 3.5, 4.5)):
        peaks = [step_peak(layers, segment_size) for layers in (4, 16, 64)]
        ratio = (peaks[2] - peaks[1]) / (peaks[1] - peaks[0])
        assert low < ratio < high, (segment_size, peaks, ratio)
        if segment_size is None:
            assert peaks[2] - peaks[1] < 24 * stream


class _RecomputedAttention(torch.autograd.Function):
    """Attention recomputed in backward, as a reversible stack does."""

    @staticmethod
    def forward(ctx, q):
        ctx.save_for_backward(q)
        return q.clone()

    @staticmethod
    def backward(ctx, grad):
        q, = ctx.saved_tensors
        with torch.enable_grad():
            q = q.detach().requires_grad_()
            out = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        return torch.autograd.grad(out, q, grad)[0]


def test_fused_attention_emulation_reaches_a_custom_backward():
    # Torch function modes are off in a custom Function's backward; the emulation must still apply there,
    # or the simulated recompute builds the B·H·T·T score tensor a GPU kernel never does.
    b, h, t, d = 2, 4, 256, 16
    original, peaks = F.scaled_dot_product_attention, []
    for fused in (False, True):
        with torch.device("meta"):
            q = torch.randn(b, h, t, d, dtype=torch.bfloat16, requires_grad=True)
        tracker = StorageTracker("meta")
        with tracker:
            if fused:
                with FusedAttention():
                    _RecomputedAttention.apply(q).sum().backward()
            else:
                _RecomputedAttention.apply(q).sum().backward()
        peaks.append(tracker.report().peak_bytes)
    assert peaks[0] - peaks[1] >= b * h * t * t * 2
    assert F.scaled_dot_product_attention is original  # put back when the emulation ends
