"""Where the fine-tuning methods attach, and what they leave trainable besides.

Positions are module paths inside one transformer block (`families.FamilyLayout`). `block_regex` turns
them into a regular expression over `named_modules()` names, the form peft accepts for `target_modules`,
so one table serves LoRA's targets and the adapters' positions.
"""

from __future__ import annotations

import re

from torch import nn

from dpmemarc_core.methods.families import FamilyLayout

CLASSIFIER_HEADS = ("classifier", "score")  # BERT/RoBERTa name their head `classifier`, GPT-2/Llama `score`


def block_regex(layout: FamilyLayout, paths: tuple[str, ...]) -> str:
    """A regex that fully matches the modules at `paths` (inside one block) in every block, at any prefix."""
    # The block list's own name and an index: GPT-2's `h.3`, BERT's `layer.3`, Llama's `layers.3`.
    block = rf"{re.escape(layout.blocks.rpartition('.')[2])}\.\d+"
    inner = "|".join(re.escape(p) for p in paths)
    return rf"(?:.*\.)?{block}\.(?:{inner})"


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
