"""One DP step the way an Opacus user writes it, for memory comparisons in the same run as ours.

GradSampleModule in hooks mode keeps each trainable layer's activations and per-example gradients
(`p.grad_sample`, B × the parameter's size); DPOptimizer clips them, adds noise and steps Adam.
"""

from __future__ import annotations

import os

import torch

from dpmemarc_core.losses import per_example_loss


def opacus_dir() -> str:
    import opacus

    return os.path.dirname(opacus.__file__)


class OpacusStep:
    """Forward, per-example loss summed, backward (Opacus hooks), DPOptimizer step (clip, noise, Adam)."""

    def __init__(self, model: torch.nn.Module, noise_multiplier: float, max_grad_norm: float,
                 expected_batch_size: int, lr: float) -> None:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        params = [p for p in model.parameters() if p.requires_grad]
        self.module = GradSampleModule(model, batch_first=True, loss_reduction="sum")
        self.inner_optimizer = torch.optim.Adam(params, lr=lr)
        self.optimizer = DPOptimizer(self.inner_optimizer, noise_multiplier=noise_multiplier,
                                     max_grad_norm=max_grad_norm, expected_batch_size=expected_batch_size,
                                     loss_reduction="sum")

    def __call__(self, batch: dict[str, torch.Tensor]) -> None:
        batch = dict(batch)
        labels = batch.pop("labels")
        losses = per_example_loss(self.module(**batch).logits, labels)
        losses.sum().backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
