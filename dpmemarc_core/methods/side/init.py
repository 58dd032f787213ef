"""Initialise the side network from the backbone by structural pruning (after Ladder Side-Tuning).

Magnitude pruning, one index set per structure, so each side weight is a sub-block of a backbone weight:
- residual stream: keep the d/r hidden dimensions whose token-embedding columns have the largest L1 norm;
  every side layer reads and writes only these dimensions;
- attention, per head: keep the head_dim/r channels with the largest summed L1 norm of their q, k, v rows
  and o column (restricted to the kept hidden dimensions), so heads stay heads;
- MLP: keep the ffn/r channels with the largest summed L1 norm of their input row(s) and output column.
Down-projections start as the selection of the kept dimensions, gates at 0.5, norms from the backbone's.
The task-specific output starts neutral: up-projection zero (the model starts exactly at the backbone: a
generation model is the pretrained LM, a classifier reads the backbone's pooled final state), classifier like a
fresh Hugging Face head. Everything is tensor ops (topk, index_select): meta-device safe.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dpmemarc_core.methods.side.families import Family, Pair
from dpmemarc_core.methods.side.network import LadderSideNetwork


@dataclass(frozen=True)
class PruningPlan:
    """Kept backbone indices, ascending within each structure (a head's channels stay in that head)."""

    hidden: torch.Tensor  # (d/r,)
    attention: list[torch.Tensor]  # per layer: kept q / o channels (heads·head_dim/r,)
    key_value: list[torch.Tensor]  # per layer: the k / v channels paired with them (differ under GQA)
    ffn: list[torch.Tensor]  # per layer: kept MLP channels (ffn/r,)


def _top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` largest scores along the last dim, in ascending index order."""
    return scores.topk(keep, dim=-1).indices.sort(dim=-1).values


def _l1_rows(weight: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    return weight.index_select(1, columns).float().abs().sum(1)


def plan_pruning(family: Family, reduction: int) -> PruningPlan:
    """Choose what the side network keeps of each backbone layer at width d/reduction."""
    hidden = _top(family.embedding.float().abs().sum(0), family.hidden // reduction)
    heads, kv_heads, head_dim = family.heads, family.kv_heads, family.head_dim
    group = heads // kv_heads
    # Under grouped-query attention, q head h reads kv head h // group; the side uses plain multi-head attention.
    kv_of_channel = ((torch.arange(heads * head_dim) // head_dim // group) * head_dim
                     + torch.arange(heads * head_dim) % head_dim).to(hidden.device)
    offsets = (torch.arange(heads, device=hidden.device) * head_dim)[:, None]
    attention, key_value, ffn = [], [], []
    with torch.no_grad():
        for layer in family.layers:
            w = family.layer_weights(layer)
            score = (_l1_rows(w.q[0], hidden) + _l1_rows(w.o[0].t(), hidden)
                     + (_l1_rows(w.k[0], hidden) + _l1_rows(w.v[0], hidden))[kv_of_channel])
            kept = (_top(score.view(heads, head_dim), head_dim // reduction) + offsets).flatten()
            attention.append(kept)
            key_value.append(kv_of_channel[kept])
            score = _l1_rows(w.fc_in[0], hidden) + _l1_rows(w.fc_out[0].t(), hidden)
            if w.fc_gate is not None:
                score = score + _l1_rows(w.fc_gate[0], hidden)
            ffn.append(_top(score, family.ffn // reduction))
    return PruningPlan(hidden=hidden, attention=attention, key_value=key_value, ffn=ffn)


def _copy_linear(target: nn.Linear, source: Pair, rows: torch.Tensor, columns: torch.Tensor) -> None:
    weight, bias = source
    target.weight.copy_(weight.index_select(0, rows).index_select(1, columns))
    if target.bias is not None:
        target.bias.copy_(bias.index_select(0, rows))


def _copy_norm(target: nn.Module, source: Pair, kept: torch.Tensor) -> None:
    weight, bias = source
    target.weight.copy_(weight.index_select(0, kept))
    if getattr(target, "bias", None) is not None:
        target.bias.copy_(bias.index_select(0, kept))


def _select(target: nn.Linear, kept: torch.Tensor) -> None:
    """Make a d → d/r down-projection pick the kept dimensions: row j is the one-hot of kept[j]."""
    target.weight.zero_()
    target.weight.scatter_(1, kept[:, None], 1.0)


def init_from_backbone(side: LadderSideNetwork, family: Family, plan: PruningPlan, initializer_range: float) -> None:
    """Copy the pruned backbone into `side` (see the module docstring for what goes where)."""
    hidden = plan.hidden
    with torch.no_grad():
        _select(side.entry, hidden)
        for layer, block, down, gate, attention, key_value, ffn in zip(
                family.layers, side.blocks, side.downs, side.gates, plan.attention, plan.key_value, plan.ffn):
            w = family.layer_weights(layer)
            _select(down, hidden)
            gate.weight.zero_()
            _copy_norm(block.attn_norm, w.attn_norm, hidden)
            _copy_linear(block.q, w.q, attention, hidden)
            _copy_linear(block.k, w.k, key_value, hidden)
            _copy_linear(block.v, w.v, key_value, hidden)
            _copy_linear(block.o, w.o, hidden, attention)
            _copy_norm(block.mlp_norm, w.mlp_norm, hidden)
            _copy_linear(block.fc_in, w.fc_in, ffn, hidden)
            if block.fc_gate is not None:
                _copy_linear(block.fc_gate, w.fc_gate, ffn, hidden)
            _copy_linear(block.fc_out, w.fc_out, hidden, ffn)
        if family.final_norm is not None:
            _copy_norm(side.final_norm, (family.final_norm.weight, getattr(family.final_norm, "bias", None)), hidden)
        side.up.weight.zero_()
        if family.task == "classification":
            side.classifier.weight.normal_(0.0, initializer_range)
            side.classifier.bias.zero_()
