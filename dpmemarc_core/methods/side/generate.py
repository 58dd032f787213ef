"""Greedy decoding for the side network's generation models (`SideTunedModel.generate`).

The side network reads every backbone layer's output at every position. Under causal attention those
outputs never change once computed, so decoding runs the frozen backbone on the new token only, with its
own KV cache, and appends the new position's layer outputs to the ones kept from earlier steps; the side
network (d/r wide, cheap) then runs over the whole sequence, and the LM head over the last position only.
Left padding is handled by giving the backbone position ids counted over real tokens, as Hugging Face's
`generate` does.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache

from dpmemarc_core.models import kv_cache_argument
from dpmemarc_core.privacy.settings import check_count


@torch.no_grad()
def greedy_generate(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    max_new_tokens: int = 20, pad_token_id: int | None = None,
                    eos_token_id: int | list[int] | None = None) -> torch.Tensor:
    """[prompt | up to `max_new_tokens` greedy tokens] per row; rows that emitted EOS continue with padding."""
    check_count(max_new_tokens, "max_new_tokens", minimum=1)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    stops = torch.tensor([] if eos_token_id is None else
                         [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id),
                         dtype=input_ids.dtype, device=input_ids.device)
    if stops.numel() and pad_token_id is None:
        raise ValueError("pad_token_id is needed to pad rows that finished (eos_token_id is set)")
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    cache = {kv_cache_argument(model.family.base): DynamicCache()}
    states: list[torch.Tensor] = []
    new_ids = input_ids
    for _ in range(max_new_tokens):
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -new_ids.shape[1]:]
        new_states, last_hidden = model.backbone_states(new_ids, attention_mask, position_ids=positions,
                                                        use_cache=True, **cache)
        states = [torch.cat([old, new], dim=1) for old, new in zip(states, new_states)] if states else new_states
        token = model.logits_of(states, last_hidden, attention_mask, last_only=True)[:, -1].argmax(-1)
        done_before = finished.clone()  # these rows get padding, masked out (the EOS itself stays visible)
        if stops.numel():
            token = torch.where(done_before, torch.full_like(token, pad_token_id), token)
            finished |= torch.isin(token, stops)
        new_ids = token[:, None]
        input_ids = torch.cat([input_ids, new_ids], dim=1)
        attention_mask = torch.cat([attention_mask, (~done_before).long()[:, None]], dim=1)
        if stops.numel() and bool(finished.all()):
            break
    return input_ids
