"""How the side network reads a Hugging Face backbone: its layer stack, sizes, block style and weights.

`read_family` reads a supported backbone (GPT-2, BERT/RoBERTa, Llama) by its family's layout
(`methods.families`). Weights are returned in nn.Linear layout (out_features, in_features) whatever the
backbone stores (GPT-2's Conv1D is (in, out)), so pruning and the side blocks never need to know which
family they came from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from dpmemarc_core.methods.families import FamilyLayout, layout_of

Pair = tuple[torch.Tensor, torch.Tensor | None]  # (weight, bias)


@dataclass(frozen=True)
class LayerWeights:
    """One backbone layer's trainable-shaped tensors, nn.Linear layout; norms as (scale, shift or None)."""

    q: Pair
    k: Pair
    v: Pair
    o: Pair
    fc_in: Pair
    fc_gate: Pair | None  # Llama's gated MLP: fc_out(act(fc_gate(x)) * fc_in(x))
    fc_out: Pair
    attn_norm: Pair
    mlp_norm: Pair


@dataclass(frozen=True)
class Family:
    """What the side network needs to know about a backbone."""

    name: str
    task: str  # "classification" or "generation"
    base: nn.Module  # the transformer without its task head
    layers: nn.ModuleList
    embedding: torch.Tensor  # (vocab, hidden)
    final_norm: nn.Module | None  # applied after the last layer (GPT-2, Llama); None for post-norm BERT
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    norm: str  # "layer" or "rms"
    eps: float
    pre_norm: bool
    causal: bool
    gated: bool
    act: str
    attn_bias: bool
    mlp_bias: bool
    layer_weights: Callable[[nn.Module], LayerWeights]

    @property
    def pools_first_token(self) -> bool:
        """Encoders classify from [CLS] (position 0); decoders from the last real token."""
        return not self.causal


def _projection(block: nn.Module, path: str, layout: FamilyLayout) -> Pair:
    module = block.get_submodule(path)
    return (module.weight.t() if layout.conv1d else module.weight), module.bias


def _norm(block: nn.Module, path: str) -> Pair:
    module = block.get_submodule(path)
    return module.weight, getattr(module, "bias", None)


def layer_weights(layout: FamilyLayout, block: nn.Module) -> LayerWeights:
    """`block`'s tensors in nn.Linear layout (Conv1D's (in, out) transposed to (out, in))."""
    q, k, v = (_projection(block, path, layout) for path in (layout.query, layout.key, layout.value))
    if layout.query == layout.key == layout.value:  # fused (GPT-2's c_attn): q, k, v stacked along the output
        (weight, bias), d = q, q[0].shape[0] // 3
        q, k, v = ((weight[i * d:(i + 1) * d], bias[i * d:(i + 1) * d]) for i in range(3))
    return LayerWeights(
        q=q, k=k, v=v, o=_projection(block, layout.attention_output, layout),
        fc_in=_projection(block, layout.mlp_in, layout),
        fc_gate=None if layout.mlp_gate is None else _projection(block, layout.mlp_gate, layout),
        fc_out=_projection(block, layout.mlp_output, layout),
        attn_norm=_norm(block, layout.attention_norm), mlp_norm=_norm(block, layout.mlp_norm))


def _task(model: nn.Module) -> str:
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "classification"
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "generation"
    raise TypeError(f"side: model class {name} is not supported; expected a *ForSequenceClassification, "
                    "*ForCausalLM or GPT2LMHeadModel")


def read_family(model: nn.Module) -> Family:
    """Describe `model` (GPT-2, BERT/RoBERTa or Llama, with a classification or causal-LM head)."""
    task = _task(model)
    layout = layout_of(model, "side", error=TypeError)
    config = model.config
    if not layout.causal and task != "classification":
        raise TypeError(f"side: {config.model_type} is supported with a sequence-classification head only, "
                        f"got {type(model).__name__}")
    base = model.base_model
    # hidden_size and num_attention_heads are every config's names (GPT-2 maps them to n_embd and n_head).
    d, heads = config.hidden_size, config.num_attention_heads
    return Family(
        name=config.model_type, task=task, base=base, layers=base.get_submodule(layout.blocks),
        embedding=base.get_input_embeddings().weight,
        final_norm=None if layout.final_norm is None else base.get_submodule(layout.final_norm),
        hidden=d, heads=heads, kv_heads=getattr(config, "num_key_value_heads", heads),
        head_dim=getattr(config, "head_dim", None) or d // heads,
        ffn=getattr(config, layout.config_ffn) or 4 * d, norm=layout.norm,
        eps=getattr(config, layout.config_eps), pre_norm=layout.pre_norm, causal=layout.causal,
        gated=layout.mlp_gate is not None, act=getattr(config, layout.config_activation),
        attn_bias=getattr(config, "attention_bias", True), mlp_bias=getattr(config, "mlp_bias", True),
        layer_weights=partial(layer_weights, layout))
