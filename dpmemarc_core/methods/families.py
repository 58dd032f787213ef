"""What the methods know about each supported Hugging Face model family, in one table (as peft keeps its
default targets in one file): where the blocks are and, inside a block, which module is the attention, the
MLP and each norm. LoRA's and the adapters' positions (`placement`), the side network's reading of the
backbone (`side.families`), the reversible network's split of a block (`rev.stack`) and the memory
simulator's choice of task (`memory.step`) all read it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class FamilyLayout:
    """One family's layout. `blocks` and `final_norm` are module paths below `model.base_model`; the other
    paths are inside one block. Config fields name the family's `PretrainedConfig` attributes."""

    blocks: str  # the list of transformer blocks
    final_norm: str | None  # applied after the last block; None for post-norm encoders
    attention: str  # the attention sub-layer (BERT's includes its output projection, residual and norm)
    mlp: str | None  # the MLP sub-layer of a pre-norm block; BERT's is two modules, run by `feed_forward_chunk`
    query: str  # GPT-2 fuses q, k and v in one projection: the same path three times
    key: str
    value: str
    attention_output: str  # the projection after attention (a Houlsby adapter follows it)
    mlp_in: str
    mlp_gate: str | None  # Llama's gated MLP: mlp_output(act(mlp_gate(x)) * mlp_in(x))
    mlp_output: str
    attention_norm: str  # before the attention (pre-norm) or after its residual sum (post-norm)
    mlp_norm: str
    norm: str  # "layer" (LayerNorm) or "rms" (RMSNorm)
    pre_norm: bool
    causal: bool  # decoder (causal LM) rather than encoder
    conv1d: bool  # projections are GPT-2's Conv1D, weight stored (in, out): peft's fan_in_fan_out
    activation: str  # the MLP's activation kind, for adapters added inside the block
    config_ffn: str  # the config's MLP width (GPT-2 leaves n_inner None for 4 * hidden)
    config_eps: str  # the config's norm epsilon
    config_activation: str  # the config's exact MLP activation function

    @property
    def query_value(self) -> tuple[str, ...]:
        """The query and value projections: LoRA's default targets (Hu et al.); one path where they are fused."""
        return tuple(dict.fromkeys((self.query, self.value)))

    @property
    def mlp_projections(self) -> tuple[str, ...]:
        """Every projection of the MLP (LoRA's include_mlp targets)."""
        return tuple(p for p in (self.mlp_gate, self.mlp_in, self.mlp_output) if p is not None)


_BERT = FamilyLayout(
    blocks="encoder.layer", final_norm=None, attention="attention", mlp=None, query="attention.self.query",
    key="attention.self.key", value="attention.self.value", attention_output="attention.output.dense",
    mlp_in="intermediate.dense", mlp_gate=None, mlp_output="output.dense", attention_norm="attention.output.LayerNorm",
    mlp_norm="output.LayerNorm", norm="layer", pre_norm=False, causal=False, conv1d=False, activation="gelu",
    config_ffn="intermediate_size", config_eps="layer_norm_eps", config_activation="hidden_act")

# model_type -> layout; the order is the one error messages list the supported families in.
FAMILIES: dict[str, FamilyLayout] = {
    "gpt2": FamilyLayout(
        blocks="h", final_norm="ln_f", attention="attn", mlp="mlp", query="attn.c_attn", key="attn.c_attn",
        value="attn.c_attn", attention_output="attn.c_proj", mlp_in="mlp.c_fc", mlp_gate=None, mlp_output="mlp.c_proj",
        attention_norm="ln_1", mlp_norm="ln_2", norm="layer", pre_norm=True, causal=True, conv1d=True,
        activation="gelu", config_ffn="n_inner", config_eps="layer_norm_epsilon",
        config_activation="activation_function"),
    "bert": _BERT,
    "roberta": _BERT,
    "llama": FamilyLayout(
        blocks="layers", final_norm="norm", attention="self_attn", mlp="mlp", query="self_attn.q_proj",
        key="self_attn.k_proj", value="self_attn.v_proj", attention_output="self_attn.o_proj", mlp_in="mlp.up_proj",
        mlp_gate="mlp.gate_proj", mlp_output="mlp.down_proj", attention_norm="input_layernorm",
        mlp_norm="post_attention_layernorm", norm="rms", pre_norm=True, causal=True, conv1d=False, activation="silu",
        config_ffn="intermediate_size", config_eps="rms_norm_eps", config_activation="hidden_act"),
}

# Encoders are fine-tuned for classification, every other family as a causal LM (the memory simulator's
# default task). Encoders without a layout above still run the methods that need none (full, BiTFiT, zo).
ENCODER_MODEL_TYPES = frozenset({name for name, layout in FAMILIES.items() if not layout.causal}
                                | {"xlm-roberta", "distilbert", "deberta", "deberta-v2", "electra", "albert",
                                   "camembert", "mpnet"})


def model_type_of(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def layout_of(model: nn.Module, method: str, error: type[Exception] = ValueError) -> FamilyLayout:
    """The layout of `model`'s family; `error` naming `method` and the supported families otherwise."""
    model_type = model_type_of(model)
    if model_type not in FAMILIES:
        raise error(f"{method}: model_type {model_type!r} ({type(model).__name__}) is not supported; "
                    f"supported: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]
