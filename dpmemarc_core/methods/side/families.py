"""How the side network reads a Hugging Face backbone: its layer stack, sizes, block style and weights.

One `Family` per supported architecture (GPT-2, BERT/RoBERTa, Llama). Weights are returned in
nn.Linear layout (out_features, in_features) whatever the backbone stores (GPT-2's Conv1D is (in, out)),
so pruning and the side blocks never need to know which family they came from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

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


def _linear(module: nn.Linear) -> Pair:
    return module.weight, module.bias


def _norm(module: nn.Module) -> Pair:
    return module.weight, getattr(module, "bias", None)


def _gpt2_weights(block: nn.Module) -> LayerWeights:
    # Conv1D stores (in, out): transpose to (out, in). c_attn packs q, k, v along its output.
    qkv_w, qkv_b = block.attn.c_attn.weight.t(), block.attn.c_attn.bias
    d = qkv_w.shape[0] // 3
    q, k, v = ((qkv_w[i * d:(i + 1) * d], qkv_b[i * d:(i + 1) * d]) for i in range(3))
    return LayerWeights(
        q=q, k=k, v=v,
        o=(block.attn.c_proj.weight.t(), block.attn.c_proj.bias),
        fc_in=(block.mlp.c_fc.weight.t(), block.mlp.c_fc.bias), fc_gate=None,
        fc_out=(block.mlp.c_proj.weight.t(), block.mlp.c_proj.bias),
        attn_norm=_norm(block.ln_1), mlp_norm=_norm(block.ln_2))


def _bert_weights(layer: nn.Module) -> LayerWeights:
    attn = layer.attention
    return LayerWeights(
        q=_linear(attn.self.query), k=_linear(attn.self.key), v=_linear(attn.self.value),
        o=_linear(attn.output.dense),
        fc_in=_linear(layer.intermediate.dense), fc_gate=None, fc_out=_linear(layer.output.dense),
        attn_norm=_norm(attn.output.LayerNorm), mlp_norm=_norm(layer.output.LayerNorm))


def _llama_weights(layer: nn.Module) -> LayerWeights:
    attn, mlp = layer.self_attn, layer.mlp
    return LayerWeights(
        q=_linear(attn.q_proj), k=_linear(attn.k_proj), v=_linear(attn.v_proj), o=_linear(attn.o_proj),
        fc_in=_linear(mlp.up_proj), fc_gate=_linear(mlp.gate_proj), fc_out=_linear(mlp.down_proj),
        attn_norm=_norm(layer.input_layernorm), mlp_norm=_norm(layer.post_attention_layernorm))


def _task(model: nn.Module) -> str:
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "classification"
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "generation"
    raise TypeError(f"side: model class {name} is not supported; expected a *ForSequenceClassification, "
                    "*ForCausalLM or GPT2LMHeadModel")


def read_family(model: nn.Module) -> Family:
    """Describe `model` (GPT-2, BERT/RoBERTa or Llama, with a classification or causal-LM head)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    task = _task(model)
    base = model.base_model
    embedding = base.get_input_embeddings().weight
    if model_type == "gpt2":
        d = config.n_embd
        return Family(
            name="gpt2", task=task, base=base, layers=base.h, embedding=embedding, final_norm=base.ln_f,
            hidden=d, heads=config.n_head, kv_heads=config.n_head, head_dim=d // config.n_head,
            ffn=config.n_inner or 4 * d, norm="layer", eps=config.layer_norm_epsilon, pre_norm=True,
            causal=True, gated=False, act=config.activation_function, attn_bias=True, mlp_bias=True,
            layer_weights=_gpt2_weights)
    if model_type in ("bert", "roberta"):
        if task != "classification":
            raise TypeError(f"side: {model_type} is supported with a sequence-classification head only, "
                            f"got {type(model).__name__}")
        d = config.hidden_size
        return Family(
            name=model_type, task=task, base=base, layers=base.encoder.layer, embedding=embedding,
            final_norm=None, hidden=d, heads=config.num_attention_heads, kv_heads=config.num_attention_heads,
            head_dim=d // config.num_attention_heads, ffn=config.intermediate_size, norm="layer",
            eps=config.layer_norm_eps, pre_norm=False, causal=False, gated=False, act=config.hidden_act,
            attn_bias=True, mlp_bias=True, layer_weights=_bert_weights)
    if model_type == "llama":
        d = config.hidden_size
        heads = config.num_attention_heads
        return Family(
            name="llama", task=task, base=base, layers=base.layers, embedding=embedding, final_norm=base.norm,
            hidden=d, heads=heads, kv_heads=config.num_key_value_heads,
            head_dim=getattr(config, "head_dim", None) or d // heads, ffn=config.intermediate_size, norm="rms",
            eps=config.rms_norm_eps, pre_norm=True, causal=True, gated=True, act=config.hidden_act,
            attn_bias=config.attention_bias, mlp_bias=config.mlp_bias, layer_weights=_llama_weights)
    raise TypeError(f"side: model_type {model_type!r} is not supported; supported: gpt2, bert, roberta, llama")
