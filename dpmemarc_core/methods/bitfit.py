"""BiTFiT (Zaken et al. 2022; DP-BiTFiT, Bu et al.): only the bias terms are trained."""

from __future__ import annotations

from torch import nn

from dpmemarc_core.methods.placement import classifier_head, freeze_all_but_head


def apply_bitfit(model: nn.Module) -> nn.Module:
    """Train every bias of the backbone (attention, MLP, LayerNorm shifts), in place.

    A classification model's head is trained whole (weights too); a causal LM's head stays frozen.
    Models without backbone biases (Llama by default) are refused, not silently given nothing to train.
    """
    head = classifier_head(model)
    biases = [p for name, p in model.named_parameters()
              if name.rsplit(".", 1)[-1] == "bias" and not (head and name.startswith(head + "."))]
    if not biases:
        raise ValueError(f"bitfit needs bias terms; {type(model).__name__} has none")
    freeze_all_but_head(model)
    for p in biases:
        p.requires_grad_(True)
    return model
