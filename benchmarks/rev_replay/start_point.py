"""Issue 15: how far rev's start point is from the pretrained model, per (λ, β): relative change of the
last hidden state, ‖h_rev − h‖/‖h‖ over real tokens, real MiniLM and SmolLM2-135M, no-grad forward.

    python rev_start_point.py OUT.json
"""
import copy
import json
import sys

import torch

from dpmemarc_core.methods.rev.stack import apply_rev
from dpmemarc_core.models import load_backbone

out = {}
for name, kind in (("minilm", "classification"), ("smollm2-135m", "generation")):
    model, tok = load_backbone(name, kind)
    texts = ["The movie was a quiet, patient portrait of a family.", "A man is playing a guitar on stage."]
    batch = tok(texts, return_tensors="pt", padding=True)
    def last_hidden(m):
        with torch.no_grad():
            return m.base_model(**batch).last_hidden_state
    # the backbone's last hidden state (after the final norm for Llama)
    base = last_hidden(model)
    keep = batch["attention_mask"].bool()
    for lam in (0.1, 0.01, 0.0):
        m = apply_rev(copy.deepcopy(model), r=4, x1_factor=lam, x2_factor=lam)
        h = last_hidden(m)
        change = ((h - base)[keep].norm() / base[keep].norm()).item()
        out[f"{name} lambda=beta={lam}"] = change
        print(name, lam, f"{change:.3g}", flush=True)
json.dump(out, open(sys.argv[1], "w"), indent=1)
