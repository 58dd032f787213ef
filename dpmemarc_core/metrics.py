"""Metrics of the paper's tables: accuracy (GLUE-style), BLEU, ROUGE-L and perplexity (E2E-style).

BLEU and ROUGE-L are on a 0-100 scale, as reported in the paper; accuracy is a fraction in [0, 1]. Evaluation
helpers take Hugging Face-style models: ``model(input_ids=..., attention_mask=...)`` returns ``.logits``, and
generation models have ``generate``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import sacrebleu
import torch
import torch.nn.functional as F
from rouge_score import rouge_scorer

from dpmemarc_core.data import IGNORE_INDEX, Task


def accuracy(preds: Sequence[int] | torch.Tensor, labels: Sequence[int] | torch.Tensor) -> float:
    """Fraction of predictions equal to their label."""
    preds, labels = torch.as_tensor(preds).flatten(), torch.as_tensor(labels).flatten()
    if len(preds) != len(labels) or len(preds) == 0:
        raise ValueError(f"preds and labels must be non-empty and of equal length, got {len(preds)} and {len(labels)}")
    return (preds == labels).float().mean().item()


def bleu(hypotheses: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """sacreBLEU corpus BLEU (0-100). Each hypothesis has one reference string or a list of them; the number
    of references may differ between hypotheses."""
    refs = _reference_lists(hypotheses, references)
    width = max(len(r) for r in refs)
    # sacreBLEU wants reference *streams* (the k-th reference of every sentence); None marks a missing one.
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(width)]
    return sacrebleu.corpus_bleu(list(hypotheses), streams).score


def rouge_l(hypotheses: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Mean ROUGE-L F-measure (0-100); with several references a hypothesis scores against its best one."""
    refs = _reference_lists(hypotheses, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score_multi(r, h)["rougeL"].fmeasure for h, r in zip(hypotheses, refs)]
    return 100.0 * sum(scores) / len(scores)


def perplexity(mean_token_nll: float) -> float:
    """exp of the mean negative log-likelihood per target token (in nats)."""
    return math.exp(mean_token_nll)


def evaluate_classification(model: torch.nn.Module, task: Task, batch_size: int = 64) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``model`` on ``task.eval``."""
    if task.kind != "classification":
        raise ValueError(f"task '{task.name}' is a {task.kind} task, not classification")
    _check_eval(task, batch_size)
    device = _device(model)
    preds, labels, loss_sum = [], [], 0.0
    with _evaluating(model):
        for start in range(0, len(task.eval), batch_size):
            batch = _to(task.collate(task.eval[start:start + batch_size]), device)
            targets = batch.pop("labels")
            logits = _full_precision(model(**batch).logits)
            loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
            preds.append(logits.argmax(-1).cpu())
            labels.append(targets.cpu())
    return {"accuracy": accuracy(torch.cat(preds), torch.cat(labels)), "loss": loss_sum / len(task.eval),
            "examples": len(task.eval)}


def evaluate_generation(
    model: torch.nn.Module,
    tokenizer,
    task: Task,
    max_new_tokens: int = 64,
    limit: int | None = None,
    batch_size: int = 16,
) -> dict[str, float]:
    """Greedy decoding from each eval prompt, scored with BLEU and ROUGE-L against all references, and
    perplexity of the reference targets under teacher forcing. ``limit`` evaluates the first examples only."""
    if task.kind != "generation":
        raise ValueError(f"task '{task.name}' is a {task.kind} task, not generation")
    _check_eval(task, batch_size)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    examples = task.eval[:limit] if limit is not None else task.eval
    device = _device(model)
    hypotheses, nll_sum, tokens = [], 0.0, 0
    with _evaluating(model):
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            batch = _to(task.collate(chunk), device)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            targets = batch["labels"][:, 1:]
            nll_sum += F.cross_entropy(_full_precision(logits[:, :-1]).flatten(0, 1), targets.flatten(),
                                       ignore_index=IGNORE_INDEX, reduction="sum").item()
            tokens += (targets != IGNORE_INDEX).sum().item()
            hypotheses += _greedy(model, tokenizer, task, chunk, max_new_tokens, device)
    references = [e["references"] for e in examples]
    mean_nll = nll_sum / max(tokens, 1)
    return {"bleu": bleu(hypotheses, references), "rouge_l": rouge_l(hypotheses, references),
            "perplexity": perplexity(mean_nll), "nll": mean_nll, "examples": len(examples)}


def _greedy(model, tokenizer, task: Task, examples: Sequence[dict], max_new_tokens: int, device) -> list[str]:
    """Decode from the prompts exactly as training tokenized them (the tokens before the first target label),
    left-padded so every prompt ends where generation starts."""
    prompts = [e["input_ids"][: _prompt_length(e["labels"])] for e in examples]
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), task.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt):] = 1
    output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                            max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=task.pad_token_id,
                            eos_token_id=tokenizer.eos_token_id)
    return [text.strip() for text in tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)]


def _prompt_length(labels: Sequence[int]) -> int:
    return next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)


def _reference_lists(hypotheses: Sequence[str], references: Sequence[str | Sequence[str]]) -> list[list[str]]:
    if len(hypotheses) != len(references) or len(hypotheses) == 0:
        raise ValueError(f"hypotheses and references must be non-empty and of equal length, got "
                         f"{len(hypotheses)} and {len(references)}")
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    if any(not r for r in refs):
        raise ValueError("every hypothesis needs at least one reference")
    return refs


def _check_eval(task: Task, batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not task.eval:
        raise ValueError(f"task '{task.name}' has no evaluation examples")


def _full_precision(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over a large vocabulary in fp16/bf16 loses digits; fp64 logits stay fp64."""
    return logits if logits.dtype == torch.float64 else logits.float()


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@contextmanager
def _evaluating(model: torch.nn.Module) -> Iterator[None]:
    """eval mode and no autograd for the block; the caller's train/eval mode comes back afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
