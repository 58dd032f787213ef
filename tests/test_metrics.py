"""Metrics against hand-computed values; evaluation loops against unbatched references."""

import math

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers import models as tokenizer_models
from transformers import GPT2Config, PreTrainedTokenizerFast

from dpmemarc_core import data, metrics
from dpmemarc_core.models import build_from_config

WORDS = "good great fine lovely bad awful poor dull the movie plot actor scene was Repeat: Copy:".split()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(tokenizer_models.WordLevel(
        {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[EOS]", *WORDS])}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                   eos_token="[EOS]")


def tiny_gpt2(kind: str, tok, seed: int = 0):
    """Random weights at a large init scale, so greedy decoding varies with the prompt and its positions."""
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=len(tok), n_positions=64, initializer_range=0.3,
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return build_from_config(config, kind, num_labels=2, device="cpu", dtype=torch.float64)


def test_accuracy():
    assert metrics.accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    assert metrics.accuracy(torch.tensor([2, 2]), torch.tensor([2, 2])) == 1.0
    with pytest.raises(ValueError, match="equal length"):
        metrics.accuracy([1], [1, 0])


def test_bleu_by_hand():
    # clipped n-gram precisions 5/6, 3/5, 2/4, 1/3; equal lengths, so no brevity penalty
    expected = 100 * math.exp((math.log(5 / 6) + math.log(3 / 5) + math.log(2 / 4) + math.log(1 / 3)) / 4)
    assert metrics.bleu(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx(expected, abs=1e-9)


def test_bleu_takes_the_best_of_a_variable_number_of_references():
    hypotheses = ["the cat sat on the mat", "a dog ran in the park"]
    references = [["the cat sat on the mat"], ["a bird flew over it", "a dog ran in the park"]]
    assert metrics.bleu(hypotheses, references) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="equal length"):
        metrics.bleu(hypotheses, references[:1])


def test_rouge_l_by_hand():
    # LCS "the cat on the mat" = 5 of 6 words on both sides: F = 5/6
    assert metrics.rouge_l(["the cat sat on the mat"], ["the cat is on the mat"]) == pytest.approx(500 / 6)
    # best reference per hypothesis, then the mean: (1 + 5/6) / 2
    score = metrics.rouge_l(["the cat sat on the mat", "the cat sat on the mat"],
                            [["a dog", "the cat sat on the mat"], "the cat is on the mat"])
    assert score == pytest.approx(100 * (1 + 5 / 6) / 2)


def test_perplexity():
    assert metrics.perplexity(math.log(5.0)) == pytest.approx(5.0)


def test_evaluate_classification_matches_a_per_example_loop():
    tok = tiny_tokenizer()
    task = data.load_task("synthetic", tok, max_train=4, max_eval=12)
    model = tiny_gpt2("classification", tok)
    model.train()
    result = metrics.evaluate_classification(model, task, batch_size=5)
    assert model.training  # the caller's mode comes back

    model.eval()
    with torch.no_grad():
        logits = [model(input_ids=torch.tensor([e["input_ids"]])).logits[0] for e in task.eval]
    labels = torch.tensor([e["labels"] for e in task.eval])
    stacked = torch.stack(logits)
    assert result["accuracy"] == metrics.accuracy(stacked.argmax(-1), labels)
    assert result["loss"] == pytest.approx(F.cross_entropy(stacked, labels).item(), rel=1e-9)
    assert result["examples"] == 12


def test_evaluate_generation_matches_unbatched_decoding(monkeypatch):
    tok = tiny_tokenizer()
    task = data.load_task("synthetic-generation", tok, max_train=2, max_eval=7)
    model = tiny_gpt2("generation", tok, seed=1)
    seen = {}
    bleu, rouge_l = metrics.bleu, metrics.rouge_l

    def spy_bleu(hypotheses, references):
        seen["hypotheses"] = list(hypotheses)
        return bleu(hypotheses, references)

    monkeypatch.setattr(metrics, "bleu", spy_bleu)
    model.eval()
    result = metrics.evaluate_generation(model, tok, task, max_new_tokens=6, limit=5, batch_size=3)
    assert not model.training

    # reference: each example alone (no padding), in float64
    hypotheses, nll, tokens = [], 0.0, 0
    with torch.no_grad():
        for example in task.eval[:5]:
            prompt_length = example["labels"].index(next(label for label in example["labels"] if label != -100))
            prompt = torch.tensor([example["input_ids"][:prompt_length]])
            output = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id,
                                    eos_token_id=tok.eos_token_id)
            hypotheses.append(tok.decode(output[0, prompt_length:], skip_special_tokens=True).strip())
            logits = model(input_ids=torch.tensor([example["input_ids"]])).logits[0, :-1]
            targets = torch.tensor(example["labels"][1:])
            nll += F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum").item()
            tokens += (targets != -100).sum().item()
    references = [e["references"] for e in task.eval[:5]]
    assert len(set(hypotheses)) > 1  # a model that says the same thing everywhere would prove nothing
    assert seen["hypotheses"] == hypotheses
    assert result["bleu"] == pytest.approx(bleu(hypotheses, references))
    assert result["rouge_l"] == pytest.approx(rouge_l(hypotheses, references))
    assert result["nll"] == pytest.approx(nll / tokens, rel=1e-9)
    assert result["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-9)
    assert result["examples"] == 5


def test_evaluators_reject_the_wrong_task_kind():
    tok = tiny_tokenizer()
    task = data.load_task("synthetic", tok, max_train=2, max_eval=2)
    with pytest.raises(ValueError, match="not generation"):
        metrics.evaluate_generation(tiny_gpt2("generation", tok), tok, task)
