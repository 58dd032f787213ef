"""Issue 15: old and new rev on the same training trajectory. The quickstart rev recipe (MiniLM, movie snippets,
r=1, lr 5e-3, T=48, eps=8's sigma) with fixed batches and a fixed noise seed (debug-only seeds: NOT private,
only to compare the two codes step by step): the trainable state and eval metrics after N steps.

    PYTHONPATH=<tree> python rev_twin_run.py OUT.pt STEPS
"""
import json
import sys

import torch

from dpmemarc_core.data import load_task
from dpmemarc_core.methods import apply
from dpmemarc_core.metrics import evaluate_classification
from dpmemarc_core.models import load_backbone
from dpmemarc_core.privacy import PrivacySettings
from dpmemarc_core.training.build import make_trainer
from dpmemarc_core.training.loop import StepStats

out, steps = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(1)
torch.manual_seed(0)
model, tok = load_backbone("minilm", "classification")
task = load_task("movie-sentiment", tok, max_length=48, max_train=1000, max_eval=300, seed=0)
model = apply(model, "rev", r=1)
privacy = PrivacySettings(target_epsilon=8.0, delta=1e-4, max_grad_norm=1.0)
trainer = make_trainer("rev", model, task.train, task.collate, privacy, sample_rate=0.128, noise_multiplier=0.755,
                       lr=5e-3, noise_seed=0, sampling_seed=0)
before = evaluate_classification(model, task)
perm = torch.Generator().manual_seed(0)
stats = StepStats()
for _ in range(steps):
    trainer.step(torch.randperm(len(task.train), generator=perm)[:128].tolist(), stats)
after = evaluate_classification(model, task)
state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
torch.save({"before": before, "after": after, "state": state}, out)
print(json.dumps({"before": before, "after": after}))
