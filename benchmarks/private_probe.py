"""Private linear probe: DP logistic regression on the frozen MiniLM's sentence embeddings of a one-text task.

The baseline row of BENCHMARKS.md ("Private recipe"): no backbone weight is trained, so it shows how much of
the task the frozen features already solve under DP. It is also the cheap instrument behind the head recipe
(pooling, feature normalisation, head initialisation, batch/steps at a fixed ε): the backbone runs once,
its features are cached, and each private run then takes seconds. The training loop is the library's own
`PrivateTrainer` (BK clipping, Poisson batches, noise, DP-Adam, RDP accounting) on a Linear head.

    python benchmarks/private_probe.py --epsilon 8 --seeds 0,1,2            # test accuracy, mean ± sd
    python benchmarks/private_probe.py --task rotten-tomatoes ...          # the other one-text offline task
    python benchmarks/private_probe.py --validation --lr 0.05,0.1 ...      # sweep on a split of train only

`--validation` carves 10 % of the training split off (as `dpmemarc train --validation` does) and reports
accuracy on it (the test split is then not read); the privacy cost of choosing hyper-parameters this way is
not accounted.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dpmemarc_core.data import _movie_sentiment, _rotten_tomatoes, _split
from dpmemarc_core.models import load_backbone
from dpmemarc_core.privacy import PrivacySettings, noise_multiplier_for
from dpmemarc_core.privacy.settings import DEFAULT_DELTA_RULE, DELTA_RULES
from dpmemarc_core.training.bk import PrivateTrainer
from dpmemarc_core.training.config import sample_rate_for

CACHE = Path.home() / ".cache" / "dpmemarc" / "probe-features"
POOLINGS = ("mean", "pooler", "cls")
# The offline classification tasks of one text per example, by `dpmemarc train --task` name: the loader splits
# by seed as training does. SNLI (a premise and a hypothesis) would need pair embeddings: not a probe here.
TASKS = {"movie-sentiment": _movie_sentiment, "rotten-tomatoes": _rotten_tomatoes}


class LinearProbe(nn.Module):
    """A Linear head over cached features, called like a classification model (`.logits`)."""

    def __init__(self, width: int, num_labels: int, init: str) -> None:
        super().__init__()
        self.classifier = nn.Linear(width, num_labels)
        if init == "zero":
            nn.init.zeros_(self.classifier.weight)
        else:  # Hugging Face's fresh head: N(0, 0.02)
            nn.init.normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, features: torch.Tensor):
        return type("Output", (), {"logits": self.classifier(features)})()


def embed(max_length: int, task: str) -> dict[str, torch.Tensor]:
    """Features of every text of `task`, keyed by pooling: mean-pooled last hidden states, the BERT pooler
    output and the [CLS] state, in the order of `all_texts`; cached on disk."""
    path = CACHE / f"{task}-T{max_length}.pt"
    if path.exists():
        return torch.load(path)
    model, tokenizer = load_backbone("minilm", "classification")
    model.eval()
    texts = all_texts(task)
    feats: dict[str, list[torch.Tensor]] = {name: [] for name in POOLINGS}
    for start in range(0, len(texts), 256):
        batch = tokenizer(texts[start:start + 256], truncation=True, max_length=max_length, padding=True,
                          return_tensors="pt")
        with torch.no_grad():
            hidden = model.bert(**batch)
        mask = batch["attention_mask"].unsqueeze(-1).float()
        feats["mean"].append((hidden.last_hidden_state * mask).sum(1) / mask.sum(1))
        feats["pooler"].append(hidden.pooler_output)
        feats["cls"].append(hidden.last_hidden_state[:, 0])
    out = {name: torch.cat(parts) for name, parts in feats.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return out


def all_texts(task: str) -> list[str]:
    train_rows, eval_rows = TASKS[task](0, None, None)
    return sorted({row["text"] for row in train_rows + eval_rows})


def split_features(features: torch.Tensor, seed: int, task: str) -> tuple[torch.Tensor, ...]:
    """Train and test features and labels of `seed`'s split, as `dpmemarc train --seed` splits the data."""
    index = {text: i for i, text in enumerate(all_texts(task))}
    train_rows, eval_rows = TASKS[task](seed, None, None)

    def rows_of(rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        return features[[index[r["text"]] for r in rows]], torch.tensor([r["label"] for r in rows])

    return (*rows_of(train_rows), *rows_of(eval_rows))


def run_probe(features: torch.Tensor, labels: torch.Tensor, eval_features: torch.Tensor, eval_labels: torch.Tensor,
              *, epsilon: float, batch_size: int, epochs: float, lr: float, max_grad_norm: float, init: str,
              clip_fn: str, delta: str | float = DEFAULT_DELTA_RULE) -> float:
    """Accuracy on the eval features after one private run (RDP; `delta` a number or a rule of N)."""
    n = len(features)
    examples = [{"features": features[i], "labels": int(labels[i])} for i in range(n)]

    def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
        if not batch:
            return {"features": torch.zeros(0, features.shape[1]), "labels": torch.zeros(0, dtype=torch.long)}
        return {"features": torch.stack([e["features"] for e in batch]),
                "labels": torch.tensor([e["labels"] for e in batch])}

    privacy = PrivacySettings(target_epsilon=epsilon, max_grad_norm=max_grad_norm, clip_fn=clip_fn, delta=delta)
    q = sample_rate_for(batch_size, n)
    steps = max(1, round(epochs * n / batch_size))
    sigma = (noise_multiplier_for(target_epsilon=epsilon, delta=privacy.resolved_delta(n), sample_rate=q, steps=steps)
             if privacy.is_private else 0.0)
    model = LinearProbe(features.shape[1], int(labels.max()) + 1, init)
    trainer = PrivateTrainer(model, examples, collate, privacy, q, sigma, lr=lr, device="cpu")
    trainer.run(steps, progress=False)
    with torch.no_grad():
        return float((model(eval_features).logits.argmax(-1) == eval_labels).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="movie-sentiment", choices=sorted(TASKS),
                        help="offline one-text classification task (default %(default)s)")
    parser.add_argument("--epsilon", default="8", help="comma-separated; inf for non-private")
    parser.add_argument("--seeds", default="0,1,2", help="public seeds: data split and head initialisation")
    parser.add_argument("--pooling", default="mean", help=f"comma-separated, of {POOLINGS}")
    parser.add_argument("--normalize", default="1", help="comma-separated 0/1: L2-normalise the features")
    parser.add_argument("--init", default="zero", help="comma-separated: zero, random")
    parser.add_argument("--batch-size", default="512")
    parser.add_argument("--epochs", default="30")
    parser.add_argument("--lr", default="0.05", help="DP-Adam learning rate(s)")
    parser.add_argument("--max-grad-norm", default="1.0")
    parser.add_argument("--clip-fn", default="abadi", help="comma-separated: abadi, automatic")
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--delta", default=DEFAULT_DELTA_RULE,
                        help=f"a number in (0, 1) or a rule of N: {', '.join(DELTA_RULES)} (default %(default)s; "
                             "simulations.table2 uses 1/N, the paper's)")
    parser.add_argument("--validation", action="store_true", help="score on 10 %% of train, never on test")
    parser.add_argument("--json", type=Path, help="append one JSON line per setting")
    args = parser.parse_args()
    try:  # a bad --delta stops here, named, before the backbone runs
        delta = args.delta if args.delta in DELTA_RULES else float(args.delta)
        PrivacySettings(delta=delta)
    except ValueError as error:
        parser.error(f"--delta {args.delta!r}: expected a number in (0, 1) or one of {', '.join(DELTA_RULES)} "
                     f"({error})")
    torch.set_num_threads(1)
    grid = [dict(epsilon=float(e), pooling=p, normalize=bool(int(z)), init=i, batch_size=int(b), epochs=float(ep),
                 lr=float(lr), max_grad_norm=float(c), clip_fn=f)
            for e in args.epsilon.split(",") for p in args.pooling.split(",") for z in args.normalize.split(",")
            for i in args.init.split(",") for b in args.batch_size.split(",") for ep in args.epochs.split(",")
            for lr in args.lr.split(",") for c in args.max_grad_norm.split(",") for f in args.clip_fn.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    features = embed(args.max_length, args.task)
    for setting in grid:
        accs = []
        for seed in seeds:
            x, y, ex, ey = split_features(features[setting["pooling"]], seed, args.task)
            if args.validation:
                train_idx, val_idx = _split(list(range(len(x))), seed + 1)
                x, y, ex, ey = x[train_idx], y[train_idx], x[val_idx], y[val_idx]
            if setting["normalize"]:
                x, ex = nn.functional.normalize(x, dim=-1), nn.functional.normalize(ex, dim=-1)
            torch.manual_seed(seed)
            accs.append(run_probe(x, y, ex, ey, delta=delta, **{k: v for k, v in setting.items()
                                                                 if k not in ("pooling", "normalize")}))
        sd = statistics.stdev(accs) if len(accs) > 1 else math.nan
        row = {"task": args.task, **setting, "delta": args.delta, "split": "validation" if args.validation else "test",
               "seeds": seeds, "accuracy": accs, "mean": float(np.mean(accs)), "sd": sd}
        print(json.dumps(row), flush=True)
        if args.json:
            with args.json.open("a") as out:
                out.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
