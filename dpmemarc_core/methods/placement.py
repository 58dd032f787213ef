"""Where the fine-tuning methods attach inside each supported Hugging Face family.

Positions are module paths inside one transformer block. `block_regex` turns them into a regular
expression over `named_modules()` names, the form peft accepts for `target_modules`, so one table
serves LoRA's targets and the adapters' positions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Placement:
    block: str  # regex of one block's path, e.g. GPT-2's `h.3`
    attention: tuple[str, ...]  # LoRA's default targets: query and value (Hu et al.); GPT-2 fuses q, k, v
    mlp: tuple[str, ...]  # added to LoRA's targets by include_mlp=True
    attention_output: str  # a Houlsby adapter follows this projection, before the residual sum
    mlp_output: str  # and this one


_BERT = Placement(block=r"layer\.\d+", attention=("attention.self.query", "attention.self.value"),
                  mlp=("intermediate.dense", "output.dense"), attention_output="attention.output.dense",
                  mlp_output="output.dense")
PLACEMENTS: dict[str, Placement] = {
    "gpt2": Placement(block=r"h\.\d+", attention=("attn.c_attn",), mlp=("mlp.c_fc", "mlp.c_proj"),
                      attention_output="attn.c_proj", mlp_output="mlp.c_proj"),
    "bert": _BERT,
    "roberta": _BERT,
    "llama": Placement(block=r"layers\.\d+", attention=("self_attn.q_proj", "self_attn.v_proj"),
                       mlp=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
                       attention_output="self_attn.o_proj", mlp_output="mlp.down_proj"),
}
CLASSIFIER_HEADS = ("classifier", "score")  # BERT/RoBERTa name their head `classifier`, GPT-2/Llama `score`


def placement_of(model: nn.Module, method: str) -> Placement:
    """The placement table of `model`'s family; ValueError naming the supported families otherwise."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in PLACEMENTS:
        raise ValueError(f"{method}: model_type {model_type!r} ({type(model).__name__}) has no known layout; "
                         f"supported: {', '.join(PLACEMENTS)}")
    return PLACEMENTS[model_type]


def block_regex(placement: Placement, paths: tuple[str, ...]) -> str:
    """A regex that fully matches the modules at `paths` inside every block, at any prefix."""
    inner = "|".join(re.escape(p) for p in paths)
    return rf"(?:.*\.)?{placement.block}\.(?:{inner})"


def classifier_head(model: nn.Module) -> str | None:
    """Attribute name of a sequence classifier's head; None for other models (causal LMs)."""
    if not type(model).__name__.endswith("ForSequenceClassification"):
        return None
    for name in CLASSIFIER_HEADS:
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    raise ValueError(f"{type(model).__name__} has none of the classifier heads {CLASSIFIER_HEADS}")


def freeze_all_but_head(model: nn.Module) -> None:
    """Freeze every parameter, then unfreeze the classifier head if the model has one."""
    model.requires_grad_(False)
    head = classifier_head(model)
    if head is not None:
        getattr(model, head).requires_grad_(True)
