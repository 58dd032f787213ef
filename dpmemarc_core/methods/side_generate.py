"""Greedy decoding for the side network's generation models (`SideTunedModel.generate`).

The side network reads every backbone layer's output at every position, so a KV cache of the backbone
alone would not do: each new token re-runs the frozen backbone and the side network over the whole
sequence (quadratic in length, fine for evaluation-length outputs). Left padding is handled by giving
the backbone position ids counted over real tokens, as Hugging Face's `generate` does.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def greedy_generate(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    max_new_tokens: int = 20, pad_token_id: int | None = None,
                    eos_token_id: int | list[int] | None = None) -> torch.Tensor:
    """[prompt | up to `max_new_tokens` greedy tokens] per row; rows that emitted EOS continue with padding."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    stops = torch.tensor([] if eos_token_id is None else
                         [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id),
                         dtype=input_ids.dtype, device=input_ids.device)
    if stops.numel() and pad_token_id is None:
        raise ValueError("pad_token_id is needed to pad rows that finished (eos_token_id is set)")
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).logits
        token = logits[:, -1].argmax(-1)
        done_before = finished.clone()  # these rows get padding, masked out (the EOS itself stays visible)
        if stops.numel():
            token = torch.where(done_before, torch.full_like(token, pad_token_id), token)
            finished |= torch.isin(token, stops)
        input_ids = torch.cat([input_ids, token[:, None]], dim=1)
        attention_mask = torch.cat([attention_mask, (~done_before).long()[:, None]], dim=1)
        if stops.numel() and bool(finished.all()):
            break
    return input_ids
