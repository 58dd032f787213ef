"""Mean pooling for BERT-style sequence classifiers whose backbone was trained as a mean-pooling sentence encoder.

all-MiniLM-L6-v2 (and most sentence-transformers encoders) was trained on the mean of its token states; the
BERT pooler it still carries (a tanh layer over [CLS]) was not part of that training. Under DP the difference
decides what a few hundred noisy steps can learn: a private probe on the frozen features loses 7-8 points with
the pooler or [CLS] against the mean (BENCHMARKS.md, "Private recipe"). `use_mean_pooling` swaps the pooler
for the masked mean of the last hidden states, so every method (LoRA, adapters, BiTFiT, full, rev) and the
Hugging Face forward, loss and export keep working unchanged. The choice travels in the model config as
``classifier_pooling = "mean"`` (ModernBERT's name for the same switch), so a saved model is rebuilt the same
way by `models.load_model`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

POOLING_KEY = "classifier_pooling"
SENTENCE_POOLING_FILE = Path("1_Pooling") / "config.json"  # sentence-transformers' pooling module


class MeanPooler(nn.Module):
    """The masked mean of the last hidden states, where a BERT model calls its pooler.

    A BERT model hands its pooler the hidden states only; the attention mask reaches this module through a
    forward pre-hook on the base model (`use_mean_pooling`) and is dropped when the base model's forward ends.
    """

    def __init__(self) -> None:
        super().__init__()
        self.mask: torch.Tensor | None = None

    def remember_mask(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.mask = kwargs.get("attention_mask")

    def forget_mask(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        self.mask = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            return hidden_states.mean(1)
        mask = self.mask.to(hidden_states.dtype).unsqueeze(-1)
        return (hidden_states * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def declares_mean_pooling(source: str | Path) -> bool:
    """Whether a local model folder is a sentence-transformers encoder that pools by the mean of its tokens."""
    path = Path(source) / SENTENCE_POOLING_FILE
    if not path.is_file():
        return False
    return bool(json.loads(path.read_text()).get("pooling_mode_mean_tokens", False))


def use_mean_pooling(model: nn.Module) -> nn.Module:
    """Make a BERT-style sequence classifier (base model with a ``pooler``) classify from the masked mean of its
    token states; in place, returns `model`. Records ``classifier_pooling = "mean"`` in the config."""
    base = model.base_model
    if getattr(base, "pooler", None) is None:
        raise ValueError(f"{type(model).__name__} has no pooler to replace; mean pooling needs a BERT-style model")
    pooler = MeanPooler()
    base.pooler = pooler
    base.register_forward_pre_hook(pooler.remember_mask, with_kwargs=True)
    base.register_forward_hook(pooler.forget_mask, with_kwargs=True)
    setattr(model.config, POOLING_KEY, "mean")
    return model


def is_mean_pooled(model: nn.Module) -> bool:
    return getattr(model.config, POOLING_KEY, None) == "mean"
