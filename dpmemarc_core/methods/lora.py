"""LoRA (Hu et al. 2021) through peft, set up so that BK clipping can serve it.

peft's LoRA layer keeps A and B as two `nn.Linear`s, which the BK engine handles like any Linear;
the frozen base projection (Linear or GPT-2's Conv1D) gets no per-example gradient at all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from torch import nn

from dpmemarc_core.methods.families import FAMILIES, layout_of, model_type_of
from dpmemarc_core.methods.placement import block_regex, classifier_head
from dpmemarc_core.privacy.settings import check_bool, check_count, check_real


def _target_modules(model: nn.Module, target_modules: str | Sequence[str] | None, include_mlp: bool) -> str | list[str]:
    if target_modules is None:
        layout = layout_of(model, "lora")
        return block_regex(layout, layout.query_value + (layout.mlp_projections if include_mlp else ()))
    if include_mlp:
        raise ValueError("lora: give either target_modules or include_mlp=True, not both")
    if isinstance(target_modules, str):
        return target_modules
    names = list(target_modules)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"lora: target_modules must be a regex or a non-empty list of module names, "
                         f"got {target_modules!r}")
    return names


def apply_lora(model: nn.Module, *, r: int = 64, lora_alpha: float | None = None, lora_dropout: float = 0.0,
               target_modules: str | Sequence[str] | None = None, include_mlp: bool = False) -> PeftModel:
    """Wrap `model` (modified in place) in a peft LoRA model; only the LoRA factors are trainable.

    Defaults: rank r=64 (the paper's), lora_alpha=r (scale α/r = 1), no dropout, and LoRA on the
    attention projections of every block, query and value as in Hu et al. (GPT-2: the fused c_attn;
    BERT/RoBERTa: query, value; Llama: q_proj, v_proj). include_mlp=True adds the MLP projections.
    `target_modules` takes peft's forms instead: a list of module-name suffixes or one regex.
    A classification model's head is trained too (peft's `modules_to_save` copy, a plain Linear stack);
    a causal LM's head stays frozen.
    """
    r = check_count(r, "lora: r", minimum=1)
    alpha = r if lora_alpha is None else lora_alpha
    check_real(alpha, "lora: lora_alpha", 0, math.inf, "()")  # checked, passed on as given (int or float)
    lora_dropout = check_real(lora_dropout, "lora: lora_dropout", 0, 1, "[)")
    check_bool(include_mlp, "lora: include_mlp")
    targets = _target_modules(model, target_modules, include_mlp)
    family = FAMILIES.get(model_type_of(model))  # None for a family without a layout, given target_modules
    head = classifier_head(model)
    if head is not None:
        task_type = TaskType.SEQ_CLS
    elif type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")):
        task_type = TaskType.CAUSAL_LM
    else:
        task_type = None
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=lora_dropout, target_modules=targets, bias="none",
        task_type=task_type, modules_to_save=[head] if head else None,
        fan_in_fan_out=family is not None and family.conv1d)  # GPT-2's Conv1D stores its weight as (in, out)
    return get_peft_model(model, config)
