"""One-run privacy audit (Steinke, Nasr & Jagielski 2023): an empirical lower bound on the ε a training run spent.

m canaries are each put into the training set with probability 1/2, independently; the real training loop runs
once; every canary gets a membership score; the auditor guesses "in" for the k highest scores, "out" for the k
lowest, and abstains on the rest. The number of right guesses turns into an ε that the run provably exceeds with
probability ≥ 1 − β if its DP claim were false (`audit_bound`).

Canaries: random sequences of tokens that no other example uses (no token in two canaries), with random labels.
Own tokens give each canary its own embedding rows, so canaries' gradients overlap little and a member's
effect is not drowned by the others'.

Score: the drop of the canary's loss from before to after training, ℓ(θ₀) − ℓ(θ_T), centred per label. It is
black-box (outputs only, so it applies to every method: LoRA, side, reversible, zeroth-order); subtracting the
starting loss removes each canary's own difficulty, and centring removes whole-class drift, neither of which
depends on the inclusion bits, so both lower the variance without biasing the test. Gradient alignment
(⟨θ_T − θ₀, ∇ℓ⟩) was the alternative; it needs per-example gradients of every method's trainable set, and under
Adam the update is not a sum of gradients, so it has no edge to pay for that.

A one-run audit gives a loose lower bound, not a proof of privacy: a bound far below the accountant's ε says the
attack is weak, not that the run is more private than claimed. It catches broken implementations (missing or
mis-scaled noise) whose leakage is large enough for loss-based membership inference to see.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from dpmemarc_core.losses import per_example_loss
from dpmemarc_core.privacy.accountant import noise_multiplier_for
from dpmemarc_core.privacy.audit_bound import epsilon_lower_bound
from dpmemarc_core.privacy.settings import PrivacySettings, check_count, check_delta
from dpmemarc_core.training.build import make_trainer
from dpmemarc_core.training.config import sample_rate_for
from dpmemarc_core.training.loop import Collate

SCORE = "loss drop (loss before minus after training), centred per label"


def make_canaries(count: int, token_ids: Sequence[int], length: int, num_labels: int, seed: int = 0,
                  wrap: Callable[[list[int]], list[int]] = list, token_type_ids: bool = False,
                  generation: bool = False) -> list[dict]:
    """`count` sequences of `length` tokens from `token_ids`, no token in two canaries, with random labels.

    Distinct tokens tie each canary's gradient to its own embedding rows (and, in a causal LM with a tied head,
    its own output rows), so canaries interfere little with each other and the audit has power. `wrap` adds a
    model's special tokens (e.g. `special_token_wrap(tokenizer)`); `token_type_ids` adds zeros
    for models whose examples carry them (every example in a batch needs the same keys). Classification
    labels are uniform over `num_labels`; for a generation task (`generation=True`) the label is the sequence
    itself, to be memorised.
    """
    check_count(count, "count", minimum=1)
    check_count(length, "length", minimum=1)
    pool = np.unique(np.asarray(token_ids, dtype=np.int64))
    if pool.ndim != 1 or len(pool) < count * length:
        raise ValueError(f"token_ids must offer count * length = {count * length} distinct ids, got {len(pool)}; "
                         "lower the number of canaries or their length")
    if not generation:
        check_count(num_labels, "num_labels", minimum=2)
    rng = np.random.default_rng(seed)
    drawn = rng.permutation(pool)[:count * length].reshape(count, length)
    canaries = []
    for row in drawn:
        ids = wrap(row.tolist())
        example = {"input_ids": ids, "attention_mask": [1] * len(ids)}
        if token_type_ids:
            example["token_type_ids"] = [0] * len(ids)
        example["labels"] = list(ids) if generation else int(rng.integers(num_labels))
        canaries.append(example)
    return canaries


def tokenizer_canaries(tokenizer, count: int, length: int, num_labels: int, examples: Sequence[dict],
                       seed: int = 0, generation: bool = False) -> list[dict]:
    """Canaries of `tokenizer`'s tokens that no example in `examples` uses (and no special token), shaped
    like those examples (same keys), so they can be mixed into the same training set."""
    if not examples:
        raise ValueError("examples must hold at least one real example to shape the canaries after")
    used = set(tokenizer.all_special_ids)
    for example in examples:
        used.update(example["input_ids"])
    pool = [i for i in range(len(tokenizer)) if i not in used]
    return make_canaries(count, pool, length, num_labels, seed=seed, wrap=special_token_wrap(tokenizer),
                         token_type_ids="token_type_ids" in examples[0], generation=generation)


def special_token_wrap(tokenizer) -> Callable[[list[int]], list[int]]:
    """What `tokenizer` puts around a text's tokens ([CLS] … [SEP], <s> …), read off the encoding of one word
    (fast tokenizers in transformers 5 have no `build_inputs_with_special_tokens`)."""
    bare = tokenizer("canary", add_special_tokens=False)["input_ids"]
    full = tokenizer("canary")["input_ids"]
    start = next((i for i in range(len(full) - len(bare) + 1) if full[i:i + len(bare)] == bare), None)
    if not bare or start is None:
        raise ValueError(f"cannot locate the text's tokens {bare} inside the encoding {full} of this tokenizer")
    prefix, suffix = full[:start], full[start + len(bare):]
    return lambda ids: [*prefix, *ids, *suffix]


@torch.no_grad()
def canary_losses(model: torch.nn.Module, canaries: Sequence[dict], collate: Collate, batch_size: int = 64,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """Per-example loss of each canary, in eval mode (no dropout), as a float64 CPU tensor."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    losses = []
    for start in range(0, len(canaries), batch_size):
        batch = {k: v.to(device) for k, v in collate(list(canaries[start:start + batch_size])).items()}
        labels = batch.pop("labels")
        losses.append(per_example_loss(model(**batch).logits, labels).double().cpu())
    model.train(was_training)
    return torch.cat(losses)


def membership_scores(before: torch.Tensor, after: torch.Tensor, canaries: Sequence[dict]) -> np.ndarray:
    """Loss drop of each canary, minus the median drop of the canaries with the same label.

    Training moves whole classes (a classifier's bias drifts towards one label), which would rank every canary
    of that label above the others whatever their membership; the median is taken over members and
    non-members alike, so the centring never looks at the inclusion bits. Generation canaries form one group.
    """
    drops = (before - after).double().numpy()
    groups = np.asarray([c["labels"] if isinstance(c["labels"], int) else -1 for c in canaries])
    for group in np.unique(groups):
        drops[groups == group] -= np.median(drops[groups == group])
    return drops


def count_correct_guesses(scores: Sequence[float], included: Sequence[bool], guesses_per_side: int) -> int:
    """Right guesses when the `guesses_per_side` highest scores are guessed "in" and as many lowest "out".

    Ties are broken by canary index (a fixed order that does not depend on the inclusion bits).
    """
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    if scores.shape != included.shape or scores.ndim != 1:
        raise ValueError(f"scores and included must be 1-D of one length, got {scores.shape} and {included.shape}")
    k = check_count(guesses_per_side, "guesses_per_side", minimum=0)
    if 2 * k > len(scores):
        raise ValueError(f"guesses_per_side must be <= canaries / 2 ({len(scores) // 2}), got {k}")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN: training diverged")
    order = np.argsort(-scores, kind="stable")
    return int(included[order[:k]].sum() + (~included[order[len(scores) - k:]]).sum())


@dataclass
class AuditResult:
    """What one audit found, next to what the accountant claims."""

    epsilon_lower_bound: float
    accountant_epsilon: float
    target_epsilon: float
    delta: float
    confidence: float
    canaries: int
    included: int
    guesses: int
    correct: int
    steps: int
    sample_rate: float
    noise_multiplier: float
    train_examples: int
    score: str
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def run_audit(model: torch.nn.Module, examples: Sequence[dict], collate: Collate, canaries: Sequence[dict],
              privacy: PrivacySettings, *, steps: int, batch_size: int, method: str = "full",
              lr: float | None = None, guesses_per_side: int | None = None, beta: float = 0.05, seed: int = 0,
              physical_batch_size: int | None = None, device: torch.device | str | None = None,
              precision: str = "fp32", noise_seed: int | None = None, progress: bool = False) -> AuditResult:
    """Train `model` once on `examples` plus a random half of `canaries`, and audit the run.

    `privacy.delta` must be set (e.g. 1e-5): the bound pays 2·m·δ, which the default δ = 1/N of training
    makes about 1. The noise is calibrated as in `train`: q = batch_size / N, σ for `privacy.target_epsilon` at
    that δ after `steps` steps. `guesses_per_side` (k, default m // 10) is fixed before training: choosing it after
    seeing the scores would void the confidence. The trainer is `dpmemarc train`'s (`make_trainer`): DPZero for
    `method` "zo", BK DP-Adam for the others, at `lr` (None: the method's default) and `precision` (the
    model's set-up, `training.precision`). `noise_seed` makes the noise repeatable (tests); leave it None to
    audit the noise a real run draws (OS entropy).
    """
    if not isinstance(privacy.delta, float):
        raise ValueError("privacy.delta must be a number for an audit (e.g. 1e-5): the bound adds 2 * canaries * delta")
    delta = check_delta(privacy.delta)
    m = check_count(len(canaries), "number of canaries", minimum=2)
    k = m // 10 if guesses_per_side is None else check_count(guesses_per_side, "guesses_per_side", minimum=1)
    if 2 * k > m:
        raise ValueError(f"guesses_per_side must be <= canaries / 2 ({m // 2}), got {k}")
    start = time.perf_counter()
    included = np.random.default_rng([seed, m]).random(m) < 0.5
    train_set = list(examples) + [c for c, keep in zip(canaries, included) if keep]
    q = sample_rate_for(batch_size, len(train_set))
    sigma = noise_multiplier_for(target_epsilon=privacy.target_epsilon, delta=delta, sample_rate=q,
                                 steps=check_count(steps, "steps", minimum=1), accountant=privacy.accountant)
    before = canary_losses(model, canaries, collate, device=device)
    trainer = make_trainer(method, model, train_set, collate, privacy, q, sigma, lr=lr,
                           physical_batch_size=physical_batch_size, device=device, noise_seed=noise_seed,
                           precision=precision)
    trainer.run(steps, progress=progress, description="audit")
    after = canary_losses(model, canaries, collate, device=device)
    correct = count_correct_guesses(membership_scores(before, after, canaries), included, k)
    spent = trainer.accountant.get_epsilon(delta) if privacy.is_private else math.inf
    return AuditResult(
        epsilon_lower_bound=epsilon_lower_bound(m, 2 * k, correct, delta, beta), accountant_epsilon=spent,
        target_epsilon=privacy.target_epsilon, delta=delta, confidence=1 - beta, canaries=m,
        included=int(included.sum()), guesses=2 * k, correct=correct, steps=steps, sample_rate=q,
        noise_multiplier=sigma, train_examples=len(train_set), score=SCORE,
        seconds=time.perf_counter() - start)
