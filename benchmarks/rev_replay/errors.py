"""Issue 15: gradient error of rev's backward, replay (new) vs the old code, on real models and deep configs.

error = ‖g − g_ref‖/‖g_ref‖ over every trainable gradient (r=4, trainable tensors set to 0.05·N(0,1) so all
are non-zero; batch of random token ids, one row right-padded; eval mode unless 'dropout').
fp32: reference = plain autograd through the same couplings in fp32 (stack.reversible = False).
bf16 (CPU autocast): reference = plain autograd in float64; plain bf16 autograd's own error beside it.

    PYTHONPATH=<tree> python rev_errors.py {old|new} OUT.json [segment_size ...]
"""
import copy
import json
import sys
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from dpmemarc_core.losses import per_example_loss
from dpmemarc_core.methods.rev.coupling import ReversibleStack
from dpmemarc_core.methods.rev.stack import apply_rev
from dpmemarc_core.models import load_backbone

which, out = sys.argv[1], sys.argv[2]
segment_sizes = [None if s == "None" else int(s) for s in sys.argv[3:]] or ["default"]

def backbone(name, dropout):
    if name == "minilm":
        return load_backbone("minilm", "classification")[0]
    if name == "smollm2-135m":
        return load_backbone("smollm2-135m", "generation")[0]
    layers = int(name.split("-L")[1])
    torch.manual_seed(0)
    p = 0.1 if dropout else 0.0
    return GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=64, n_head=4, vocab_size=500, n_positions=64,
                                      bos_token_id=0, eos_token_id=0, resid_pdrop=p, embd_pdrop=p, attn_pdrop=p))

def grads(model, batch, rev, bf16=False):
    next(m for m in model.modules() if isinstance(m, ReversibleStack)).reversible = rev
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    per_example_loss(logits.float() if bf16 else logits, batch["labels"]).sum().backward()
    return torch.cat([p.grad.double().flatten() for p in model.parameters() if p.requires_grad])

def rel(a, b):
    e = ((a - b).norm() / b.norm()).item()
    return e if e == e else float("inf")

rows = []
cases = [("minilm", False), ("minilm", True), ("gpt2-L12", False), ("gpt2-L36", False), ("gpt2-L36", True),
         ("smollm2-135m", False)]
for name, dropout in cases:
    for seg in segment_sizes:
        t = time.time()
        model = backbone(name, dropout)
        size, length = (2, 12) if name == "smollm2-135m" else (4, 24)
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(5, min(model.config.vocab_size, 30000), (size, length), generator=gen)
        mask = torch.ones_like(ids); mask[1, -5:] = 0
        labels = torch.arange(size) % 2 if model.config.model_type == "bert" else ids.masked_fill(mask == 0, -100)
        batch = dict(input_ids=ids, attention_mask=mask, labels=labels)
        options = {} if seg == "default" else {"segment_size": seg}
        model = apply_rev(model, r=4, **options)
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))
        model.train() if dropout else model.eval()
        row = {"code": which, "model": name, "dropout": dropout, "segment_size": str(seg),
               "layers": len(next(m for m in model.modules() if isinstance(m, ReversibleStack)).blocks)}
        row["fp32_rev_vs_plain_fp32"] = rel(grads(model, batch, True), grads(model, batch, False))
        if not dropout:  # float64 reference: no dropout (the mask draws differ across dtypes)
            exact = grads(copy.deepcopy(model).double(), batch, False)
            row["bf16_plain_vs_fp64"] = rel(grads(model, batch, False, True), exact)
            row["bf16_rev_vs_fp64"] = rel(grads(model, batch, True, True), exact)
        row["seconds"] = round(time.time() - t, 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
json.dump({"command": " ".join(sys.argv), "rows": rows}, open(out, "w"), indent=1)
