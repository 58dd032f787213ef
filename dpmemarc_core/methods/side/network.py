"""The ladder side network: thin transformer blocks of width d/r fed by every backbone layer.

Built only from nn.Linear, nn.LayerNorm and nn.RMSNorm, the layers the BK engine has per-example rules
for. The LST gate σ(α_i/T) is a scalar per layer; it lives in an nn.Linear(1, 1) applied to a constant
one per example, so BK sees it as an ordinary linear layer with a per-example input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from dpmemarc_core.methods.side.families import Family
from dpmemarc_core.models import FUSED_ACTIVATIONS

GATE_TEMPERATURE = 0.1  # LST's T: with α₀ = 0 the gate starts at 0.5 and moves quickly once trained


def make_norm(family: Family, width: int, **factory) -> nn.Module:
    """The backbone family's norm at the side width (torch's RMSNorm for Llama: computes in its input dtype)."""
    if family.norm == "rms":
        return nn.RMSNorm(width, eps=family.eps, **factory)
    return nn.LayerNorm(width, eps=family.eps, **factory)


def matmul_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype a matmul of `x` by `weight` runs in: autocast's where it is on for `x`'s device, else the weight's."""
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


def allowed_keys(attention_mask: torch.Tensor | None, batch: int, length: int, causal: bool,
                 device: torch.device) -> torch.Tensor:
    """Boolean (B, 1, T, T) mask of the keys each query may attend to.

    Padded keys are never allowed. Each query always keeps itself, so no row is empty (a padded query
    in a left-padded causal batch would otherwise softmax over nothing and produce NaN); real queries
    are unaffected because their own position is a real key.
    """
    allowed = torch.ones(length, length, dtype=torch.bool, device=device)
    if causal:
        allowed = allowed.tril()
    allowed = allowed.expand(batch, 1, length, length)
    if attention_mask is not None:
        allowed = allowed & attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
    return allowed | torch.eye(length, dtype=torch.bool, device=device)


class SideBlock(nn.Module):
    """A transformer block at the side width, in the backbone's style (pre- or post-norm, gated MLP or not).

    No positional encoding of its own: position reaches the side network through the backbone states
    it is fed at every layer (and through the causal mask in decoders).
    """

    def __init__(self, family: Family, width: int, heads: int, head_dim: int, ffn: int, **factory) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.pre_norm, self.causal = family.pre_norm, family.causal
        inner = heads * head_dim
        self.attn_norm = make_norm(family, width, **factory)
        self.q = nn.Linear(width, inner, bias=family.attn_bias, **factory)
        # No key bias even where the backbone has one: softmax ignores a shift shared by all keys, so its
        # gradient is identically zero and under DP it would only collect noise.
        self.k = nn.Linear(width, inner, bias=False, **factory)
        self.v = nn.Linear(width, inner, bias=family.attn_bias, **factory)
        self.o = nn.Linear(inner, width, bias=family.attn_bias, **factory)
        self.mlp_norm = make_norm(family, width, **factory)
        self.fc_in = nn.Linear(width, ffn, bias=family.mlp_bias, **factory)
        self.fc_gate = nn.Linear(width, ffn, bias=family.mlp_bias, **factory) if family.gated else None
        self.fc_out = nn.Linear(ffn, width, bias=family.mlp_bias, **factory)
        self.act = ACT2FN[FUSED_ACTIVATIONS.get(family.act, family.act)]

    def attend(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        # One cast shared by q, k and v: under autocast a normed fp32 input would otherwise be cast once
        # per projection, and autograd and BK would keep each copy and the fp32 tensor besides.
        x = x.to(matmul_dtype(x, self.q.weight))
        batch, length, _ = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.heads, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)), attn_mask=allowed)
        return self.o(out.transpose(1, 2).reshape(batch, length, self.heads * self.head_dim))

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(matmul_dtype(x, self.fc_in.weight))
        if self.fc_gate is not None:
            return self.fc_out(self.act(self.fc_gate(x)) * self.fc_in(x))
        return self.fc_out(self.act(self.fc_in(x)))

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.attend(self.attn_norm(x), allowed)
            return x + self.feed_forward(self.mlp_norm(x))
        x = self.attn_norm(x + self.attend(x, allowed))
        return self.mlp_norm(x + self.feed_forward(x))


class LadderSideNetwork(nn.Module):
    """Side stream s₀ = entry(e); for each layer i: s ← μ_i·s + (1−μ_i)·down_i(h_i), s ← block_i(s).

    e is the backbone's embedding output and h_i its layer i output (both d wide, no autograd history);
    μ_i = σ(α_i / T). The result is normalised; `up` projects it back to d, where it is added to the backbone's
    final state (the paper's y = α·F₁(W_p; x) + β·F₂(ΔW; x), eq. 6), which the task head reads: the frozen LM
    head, or `classifier` (d wide) for classification.
    """

    def __init__(self, family: Family, reduction: int, num_labels: int | None, **factory) -> None:
        super().__init__()
        d = family.hidden
        self.width = d // reduction
        layers = len(family.layers)
        self.entry = nn.Linear(d, self.width, bias=False, **factory)
        self.downs = nn.ModuleList(nn.Linear(d, self.width, bias=False, **factory) for _ in range(layers))
        self.gates = nn.ModuleList(nn.Linear(1, 1, bias=False, **factory) for _ in range(layers))
        self.blocks = nn.ModuleList(
            SideBlock(family, self.width, family.heads, family.head_dim // reduction, family.ffn // reduction,
                      **factory) for _ in range(layers))
        self.final_norm = make_norm(family, self.width, **factory)
        self.up = nn.Linear(self.width, d, bias=False, **factory)
        if family.task == "classification":
            self.classifier = nn.Linear(d, num_labels, **factory)

    def forward(self, states: list[torch.Tensor], allowed: torch.Tensor) -> torch.Tensor:
        """`states`: the embedding output then each layer's output, [B, T, d]; returns [B, T, d/r]."""
        # Cast the backbone states only to the dtype the down-projections compute in: under autocast a
        # bf16 state is then the very tensor autograd and BK keep for the weight gradient, not an fp32 copy
        # of it (plus the bf16 copy autocast would make back from that).
        dtype = matmul_dtype(states[0], self.entry.weight)
        x = self.entry(states[0].to(dtype))
        one = x.new_ones(x.shape[0], 1, 1)  # per example, so the gate's per-example gradient is its own
        for block, down, gate, h in zip(self.blocks, self.downs, self.gates, states[1:]):
            mix = torch.sigmoid(gate(one) / GATE_TEMPERATURE)
            x = mix * x + (1 - mix) * down(h.to(dtype))
            x = block(x, allowed)
        return self.final_norm(x)
