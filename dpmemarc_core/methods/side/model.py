"""DP-MemArc's side network (`side`, after Ladder Side-Tuning, Sung et al. 2022; paper §3.1).

The backbone runs under torch.no_grad(): nothing of it is kept for backward except the layer outputs the
side network's down-projections read (their weight gradients need them). A ladder side network of width
d/r (network.py), initialised by structural pruning of the backbone (init.py), is the only
trainable part. Classification reads the side state at [CLS] (encoders), the last real token (decoders) or,
when the backbone classifies from the mean of its token states (`dpmemarc_core.pooling`), their mean,
through a LayerNorm/RMSNorm and a linear classifier; generation up-projects the side state to d, adds it to
the backbone's final hidden state and applies the frozen LM head.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutput, SequenceClassifierOutput

from dpmemarc_core.losses import causal_lm_loss_from_hidden, per_example_loss
from dpmemarc_core.methods.side.families import Family, read_family
from dpmemarc_core.methods.side.generate import greedy_generate
from dpmemarc_core.methods.side.init import init_from_backbone, plan_pruning
from dpmemarc_core.methods.side.network import (
    LadderSideNetwork,
    allowed_keys,
    matmul_dtype,
)
from dpmemarc_core.methods.side.state_cache import BackboneStateCache, assemble
from dpmemarc_core.pooling import is_mean_pooled
from dpmemarc_core.privacy.settings import check_count


def _hidden_of(output: torch.Tensor | tuple) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def pool(states: torch.Tensor, attention_mask: torch.Tensor | None, first_token: bool,
         mean: bool = False) -> torch.Tensor:
    """[B, T, w] → [B, w]: the mean over real tokens (`mean`), position 0, or each example's last real token
    (right or left padding)."""
    if mean:
        if attention_mask is None:
            return states.mean(1)
        weights = attention_mask.to(device=states.device, dtype=states.dtype).unsqueeze(-1)
        return (states * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    if first_token:
        return states[:, 0]
    batch, length, width = states.shape
    if attention_mask is None:
        return states[:, -1]
    positions = torch.arange(length, device=states.device)
    last = (attention_mask.to(device=states.device, dtype=torch.long) * positions).argmax(-1)
    return states.gather(1, last.view(batch, 1, 1).expand(batch, 1, width)).squeeze(1)


class SideTunedModel(nn.Module):
    """A frozen backbone plus a trainable ladder side network, called like the backbone.

    `forward(input_ids, attention_mask, labels, **backbone_kwargs)` returns `.logits` and, given labels,
    `.loss`: the mean over examples of `dpmemarc_core.losses.per_example_loss`. Trainers get the
    per-example losses through `losses.model_per_example_loss`, which asks `reduction="none"`.
    """

    computes_per_example_loss = True  # see losses.model_per_example_loss

    def __init__(self, backbone: nn.Module, family: Family, side: LadderSideNetwork) -> None:
        super().__init__()
        self.backbone = backbone
        self.side = side
        self.config = backbone.config
        self.family = family
        # Set while a run draws examples more than once (state_cache.cached_backbone_states); None: compute.
        self.state_cache: BackboneStateCache | None = None

    def backbone_states(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                        **backbone_kwargs) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Without autograd: [embedding output, layer 1 output, ..., layer L output] and the final hidden state
        (rows seen before come from `state_cache` when one is set)."""
        cache = self.state_cache
        if cache is None or input_ids is None:
            return self._compute_backbone_states(input_ids, attention_mask, **backbone_kwargs)
        inputs = {"input_ids": input_ids, **{k: v for k, v in backbone_kwargs.items() if k != "use_cache"}}
        lengths = BackboneStateCache.lengths(input_ids, attention_mask)
        if lengths is None or not all(isinstance(t, torch.Tensor) and t.shape == input_ids.shape
                                      for t in inputs.values()):
            # left padding, or an input the key does not cover: computed, not cached
            return self._compute_backbone_states(input_ids, attention_mask, **backbone_kwargs)
        keys = BackboneStateCache.keys(lengths, list(inputs.values()))
        rows = cache.rows(keys)
        missing = [i for i, row in enumerate(rows) if row is None]
        if missing:
            # only the rows not seen before go through the backbone, cut to their longest real length
            index = torch.tensor(missing, device=input_ids.device)
            width = max(int(lengths[missing].max()), 1)
            sub = {k: v.index_select(0, index)[:, :width] for k, v in inputs.items()}
            sub_mask = None if attention_mask is None else attention_mask.index_select(0, index)[:, :width]
            extra = {k: v for k, v in backbone_kwargs.items() if k == "use_cache"}
            states, last_hidden = self._compute_backbone_states(attention_mask=sub_mask, **sub, **extra)
            computed = cache.store([keys[i] for i in missing], lengths[missing], states, last_hidden)
            for i, row in zip(missing, computed):
                rows[i] = row
        return assemble(rows, input_ids.shape[1], input_ids.device)

    def _compute_backbone_states(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                                 **backbone_kwargs) -> tuple[list[torch.Tensor], torch.Tensor]:
        layers = self.family.layers
        states: list[torch.Tensor] = []

        def keep(state: torch.Tensor) -> None:
            # Kept in the dtype the down-projections compute in: under autocast a post-norm backbone
            # (BERT, RoBERTa) hands on fp32 layer outputs, and only their bf16 casts are needed.
            states.append(state.to(matmul_dtype(state, self.side.entry.weight)))

        handles = [layers[0].register_forward_pre_hook(
            lambda module, args, kwargs: keep(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)]
        handles += [layer.register_forward_hook(lambda module, args, output: keep(_hidden_of(output)))
                    for layer in layers]
        if self.family.causal:
            backbone_kwargs.setdefault("use_cache", False)
        try:
            with torch.no_grad():
                out = self.family.base(input_ids=input_ids, attention_mask=attention_mask, **backbone_kwargs)
        finally:
            for handle in handles:
                handle.remove()
        return states, out.last_hidden_state

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, reduction: str = "mean",
                **backbone_kwargs) -> SequenceClassifierOutput | CausalLMOutput:
        """`.logits` and, given labels, `.loss`: the mean of the per-example losses, or with `reduction="none"`
        the per-example losses [B] themselves; a generation model then runs its LM head inside the loss
        chunks and returns no logits (the B·T·V logits and their gradient are never whole)."""
        if reduction not in ("mean", "none"):
            raise ValueError(f"side: reduction must be 'mean' or 'none', got {reduction!r}")
        states, last_hidden = self.backbone_states(input_ids, attention_mask, **backbone_kwargs)
        if self.family.task == "classification":
            # Only its pool is read: pooled now, the final state does not sit through the side network's forward.
            last_hidden = self._pool(last_hidden, attention_mask)
        output_type = SequenceClassifierOutput if self.family.task == "classification" else CausalLMOutput
        head = self.backbone.get_output_embeddings()
        if labels is not None and reduction == "none" and isinstance(head, nn.Linear):
            hidden = self._lm_hidden(self._side_states(states, attention_mask), last_hidden)
            return output_type(loss=causal_lm_loss_from_hidden(hidden, head, labels), logits=None)
        logits = self.logits_of(states, last_hidden, attention_mask)
        if labels is None:
            return output_type(loss=None, logits=logits)
        losses = per_example_loss(logits, labels)
        return output_type(loss=losses if reduction == "none" else losses.mean(), logits=logits)

    def _side_states(self, states: list[torch.Tensor], attention_mask: torch.Tensor | None) -> torch.Tensor:
        batch, length = states[0].shape[:2]
        return self.side(states, allowed_keys(attention_mask, batch, length, self.family.causal, states[0].device))

    def _pool(self, states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return pool(states, attention_mask, self.family.pools_first_token, mean=is_mean_pooled(self.backbone))

    def _lm_hidden(self, side: torch.Tensor, last_hidden: torch.Tensor) -> torch.Tensor:
        """What a generation model's LM head reads: the backbone's final state plus the up-projected side state."""
        return last_hidden + self.side.up(side).to(last_hidden.dtype)

    def logits_of(self, states: list[torch.Tensor], last_hidden: torch.Tensor | None,
                  attention_mask: torch.Tensor | None, last_only: bool = False) -> torch.Tensor:
        """The side network over the backbone `states` of every position; a generation model's logits at
        every position, or at the last one only (`last_only`: decoding needs no other, and the LM head
        over the whole sequence costs more than the side network). A classifier's `last_hidden` is the
        backbone's final state already pooled ([B, d])."""
        if self.family.task == "classification":
            # Pooling is linear, so pool(h + up(s)) = pool(h) + up(pool(s)): `up` runs on one vector per example.
            side = self._pool(self._side_states(states, attention_mask), attention_mask)
            return self.side.classifier(last_hidden + self.side.up(side).to(last_hidden.dtype))
        side = self._side_states(states, attention_mask)
        if last_only:
            side, last_hidden = side[:, -1:], last_hidden[:, -1:]
        return self.backbone.get_output_embeddings()(self._lm_hidden(side, last_hidden))

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 20, do_sample: bool = False, pad_token_id: int | None = None,
                 eos_token_id: int | list[int] | None = None) -> torch.Tensor:
        """Greedy decoding (see `side_generate`); generation models only, no sampling."""
        if self.family.task != "generation":
            raise ValueError("side: generate needs a causal-LM backbone (GPT2LMHeadModel, LlamaForCausalLM)")
        if do_sample:
            raise ValueError("side: generate supports greedy decoding only (do_sample=False)")
        return greedy_generate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, eos_token_id)


def apply_side(model: nn.Module, reduction: int = 8, **options) -> SideTunedModel:
    """Freeze `model` and wrap it with a ladder side network of width hidden_size / `reduction`.

    `model`: GPT2LMHeadModel, GPT2/Llama/BERT/RoBERTa ...ForSequenceClassification or LlamaForCausalLM.
    `reduction` must divide the hidden size, the attention head size and the MLP size. The side network
    is created on the backbone's device in its parameter dtype and is the only requires_grad part.
    """
    if options:
        raise ValueError(f"side: unknown option(s) {sorted(options)}; accepted: reduction")
    family = read_family(model)
    sizes = {"hidden size": family.hidden, "attention head size": family.head_dim, "MLP size": family.ffn}
    reduction = check_count(reduction, "side: reduction", minimum=1)
    if any(size % reduction for size in sizes.values()):
        divisors = [r for r in range(1, family.head_dim + 1) if all(size % r == 0 for size in sizes.values())]
        raise ValueError(f"side: reduction must be an integer that divides {sizes}; accepted here: {divisors}, "
                         f"got {reduction!r}")
    num_labels = None
    if family.task == "classification":
        num_labels = model.config.num_labels
        if num_labels < 2:
            raise ValueError(f"side: config.num_labels must be >= 2 (classification with cross-entropy), "
                             f"got {num_labels}")
    model.requires_grad_(False)
    reference = next(model.parameters())
    side = LadderSideNetwork(family, reduction, num_labels, device=reference.device, dtype=reference.dtype)
    init_from_backbone(side, family, plan_pruning(family, reduction),
                       getattr(model.config, "initializer_range", 0.02))
    return SideTunedModel(model, family, side)
