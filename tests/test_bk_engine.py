"""The BK engine's contract on plain Hugging Face models and bare layers, against the float64 reference.

Tiny float64 models in eval mode (dropout off), batches with full, right-padded and left-padded rows.
The tiny-model builders and the float64 loss here are shared with test_bk_methods.py and test_methods.py.
"""

from __future__ import annotations

import copy
import functools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from bk_reference import assert_bk_matches_reference, bk_result, clipped_reference
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from dpmemarc_core.losses import per_example_loss
from dpmemarc_core.methods import apply, load_trainable_state_dict, trainable_state_dict
from dpmemarc_core.privacy import BKEngine

VOCAB, BATCH, SEQ, LABELS = 40, 4, 6, 3
CLIPPING = [(mode, fn, passes) for mode in ("mixed", "ghost", "instantiate") for fn in ("abadi", "automatic")
            for passes in (1, 2)]


# ---- tiny models and batches (shared) ------------------------------------------------------------

def _gpt2(dtype=torch.float64) -> nn.Module:
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=SEQ + 2, n_embd=16, n_layer=2, n_head=2,
                                      resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, bos_token_id=0,
                                      eos_token_id=0)).to(dtype)


def _bert() -> nn.Module:
    return BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=SEQ + 2, type_vocab_size=2, hidden_dropout_prob=0, attention_probs_dropout_prob=0,
        num_labels=LABELS, pad_token_id=0)).double()


def _roberta() -> nn.Module:
    # RoBERTa numbers positions from padding_idx + 1, and pads get position padding_idx (a padding row).
    return RobertaForSequenceClassification(RobertaConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=SEQ + 3, hidden_dropout_prob=0, attention_probs_dropout_prob=0,
        num_labels=LABELS, pad_token_id=1, bos_token_id=0, eos_token_id=2)).double()


def _llama(tied: bool, bias: bool = False) -> nn.Module:
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=SEQ + 2, tie_word_embeddings=tied, attention_bias=bias,
        mlp_bias=bias, bos_token_id=0, eos_token_id=0, pad_token_id=0)).double()


@dataclass(frozen=True)
class Family:
    build: Callable[[], nn.Module]
    pad_id: int
    classification: bool
    token_types: bool = False


FAMILIES: dict[str, Family] = {
    "gpt2": Family(_gpt2, pad_id=0, classification=False),
    "bert": Family(_bert, pad_id=0, classification=True, token_types=True),
    "roberta": Family(_roberta, pad_id=1, classification=True),
    "llama": Family(functools.partial(_llama, tied=True), pad_id=0, classification=False),
    "llama_untied": Family(functools.partial(_llama, tied=False), pad_id=0, classification=False),
    "llama_bias": Family(functools.partial(_llama, tied=True, bias=True), pad_id=0, classification=False),
}


def build(family: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return FAMILIES[family].build().eval()


def make_batch(family: str, seed: int = 1, size: int = BATCH) -> dict[str, torch.Tensor]:
    """Rows: full, right-padded, left-padded, right-padded to 2 tokens (repeating)."""
    spec = FAMILIES[family]
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (size, SEQ), generator=gen)
    mask = torch.ones(size, SEQ, dtype=torch.long)
    for row in range(size):
        kind = row % 4
        if kind == 1:
            mask[row, 4:] = 0
        elif kind == 2:
            mask[row, :3] = 0
        elif kind == 3:
            mask[row, 2:] = 0
    ids = ids.masked_fill(mask == 0, spec.pad_id)
    batch = {"input_ids": ids, "attention_mask": mask}
    if spec.token_types:
        batch["token_type_ids"] = (torch.arange(SEQ) >= SEQ // 2).long().expand(size, SEQ).clone()
    if spec.classification:
        batch["labels"] = torch.randint(0, LABELS, (size,), generator=gen)
    else:
        batch["labels"] = ids.masked_fill(mask == 0, -100)
    return batch


def loss64(model: nn.Module, batch: dict) -> torch.Tensor:
    """losses.per_example_loss computed in the logits' dtype (it casts to fp32, which breaks a 1e-6 check)."""
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    labels = batch["labels"]
    if labels.dim() == 1:
        return F.cross_entropy(logits, labels, reduction="none")
    targets = labels[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none", ignore_index=-100)
    counted = (targets != -100).to(nll.dtype)
    return (nll * counted).sum(1) / counted.sum(1).clamp(min=1)


def freeze_key_biases(model: nn.Module) -> None:
    """BERT/RoBERTa key biases shift every score of a query equally, so softmax gives them an exactly zero
    gradient: both sides are rounding noise and a relative comparison of noise says nothing."""
    for name, p in model.named_parameters():
        if name.endswith("attention.self.key.bias"):
            p.requires_grad_(False)


def median_norm(model: nn.Module, batch: dict, loss_fn=loss64) -> float:
    """A clipping threshold that clips about half of the examples (norms do not depend on it)."""
    norms, _, _ = bk_result(model, batch, loss_fn, max_grad_norm=1e30)
    return norms.double().median().item()


# ---- bare layers ---------------------------------------------------------------------------------

class TwiceApplied(nn.Module):
    """One Linear used twice in a forward: its per-example gradient has a cross term between the calls."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 7)
        self.shared = nn.Linear(7, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared(torch.tanh(self.shared(torch.tanh(self.inp(x)))))


def _bare(kind: str) -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    shape = {"linear_2d": (BATCH, 5), "linear_3d": (BATCH, SEQ, 5), "linear_twice": (BATCH, SEQ, 5)}[kind]
    model = TwiceApplied() if kind == "linear_twice" else nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    return model.double(), {"x": torch.randn(*shape, dtype=torch.float64)}


def bare_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    out = model(batch["x"])
    return out.pow(2).flatten(1).sum(1)


# ---- the reference contract ----------------------------------------------------------------------

# Trainable subsets: a position table alone (HF broadcasts its ids over the batch), a bias without its
# weight, a weight without its bias, token types, the padded word table, an untied head, a norm.
SUBSETS: dict[str, Callable[[str], bool]] = {
    "gpt2": lambda n: n in {"transformer.wpe.weight", "transformer.ln_f.weight", "transformer.h.1.attn.c_attn.weight",
                            "transformer.h.0.mlp.c_fc.bias"},
    "bert": lambda n: n.startswith(("classifier.", "bert.embeddings.token_type", "bert.embeddings.position"))
    or n == "bert.encoder.layer.0.attention.self.query.weight",
    "roberta": lambda n: n.startswith("classifier.out_proj.") or n in {
        "roberta.embeddings.word_embeddings.weight", "roberta.encoder.layer.1.output.dense.weight"},
    "llama": lambda n: n in {"model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight"},
    "llama_untied": lambda n: n in {"lm_head.weight", "model.norm.weight", "model.layers.1.input_layernorm.weight"},
}


@functools.cache
def _threshold(family: str, subset: bool) -> float:
    model = _prepared(family, subset)
    return median_norm(model, make_batch(family))


def _prepared(family: str, subset: bool) -> nn.Module:
    model = build(family)
    if subset:
        for name, p in model.named_parameters():
            p.requires_grad_(SUBSETS[family](name))
    freeze_key_biases(model)
    return model


@pytest.mark.parametrize("mode,clip_fn,passes", CLIPPING)
@pytest.mark.parametrize("family", ["gpt2", "bert", "roberta", "llama", "llama_untied"])
def test_hf_models_all_trainable(family, mode, clip_fn, passes):
    model = _prepared(family, subset=False)
    assert_bk_matches_reference(model, make_batch(family), loss64, max_grad_norm=_threshold(family, False),
                                clipping_mode=mode, clip_fn=clip_fn, backward_passes=passes)


@pytest.mark.parametrize("mode,clip_fn,passes", [("mixed", "abadi", 1), ("ghost", "automatic", 2),
                                                 ("instantiate", "abadi", 2), ("mixed", "abadi", "auto")])
@pytest.mark.parametrize("family", list(SUBSETS))
def test_hf_models_trainable_subset(family, mode, clip_fn, passes):
    model = _prepared(family, subset=True)
    assert {n for n, p in model.named_parameters() if p.requires_grad}, "the subset selects nothing"
    assert_bk_matches_reference(model, make_batch(family), loss64, max_grad_norm=_threshold(family, True),
                                clipping_mode=mode, clip_fn=clip_fn, backward_passes=passes)


@pytest.mark.parametrize("mode,clip_fn,passes", CLIPPING)
@pytest.mark.parametrize("kind", ["linear_2d", "linear_3d", "linear_twice"])
def test_bare_linear(kind, mode, clip_fn, passes):
    model, batch = _bare(kind)
    threshold = median_norm(model, batch, bare_loss)
    assert_bk_matches_reference(model, batch, bare_loss, max_grad_norm=threshold, clipping_mode=mode,
                                clip_fn=clip_fn, backward_passes=passes)


# ---- construction ------------------------------------------------------------------------------

class WithConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 4), nn.Conv2d(1, 1, 3))


class ScaledGate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))


class WithBareParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.blocks = nn.ModuleList([ScaledGate()])


@pytest.mark.parametrize("make,path,type_name", [(WithConv, "body.1", "torch.nn.modules.conv.Conv2d"),
                                                 (WithBareParameter, "blocks.0", "ScaledGate")])
def test_unsupported_trainable_module_is_refused_at_construction(make, path, type_name):
    with pytest.raises(TypeError, match=rf"'{path}' of type [\w.]*{type_name}\b"):
        BKEngine(make())


def test_unsupported_module_is_fine_when_frozen():
    model = WithConv()
    model.body[1].requires_grad_(False)
    BKEngine(model).detach()


# ---- gradients -----------------------------------------------------------------------------------

def test_frozen_parameters_get_no_grad():
    model = _prepared("gpt2", subset=True)
    engine = BKEngine(model)
    engine.clipped_backward(loss64(model, make_batch("gpt2")))
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name


@pytest.mark.parametrize("passes", [1, 2])
def test_grad_accumulates_over_micro_batches(passes):
    model = _prepared("llama_untied", subset=False)
    first, second = make_batch("llama_untied", seed=1), make_batch("llama_untied", seed=2)
    threshold = _threshold("llama_untied", False)
    engine = BKEngine(model, max_grad_norm=threshold, backward_passes=passes)
    for batch in (first, second):
        engine.clipped_backward(loss64(model, batch))
    engine.detach()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    _, sums_first = clipped_reference(model, first, loss64, threshold)
    _, sums_second = clipped_reference(model, second, loss64, threshold)
    for name, grad in grads.items():
        expected = sums_first[name] + sums_second[name]
        torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())


@pytest.mark.parametrize("passes", [1, 2])
def test_each_tap_fires_once_per_backward_pass(passes):
    model = _prepared("gpt2", subset=False)
    engine = BKEngine(model, backward_passes=passes)
    arrivals: Counter[int] = Counter()
    calls = []

    # Registered after the engine's hooks, so each sees the tapped output whose gradient the tap receives.
    def count(module, args, output):
        key = len(calls)
        calls.append(module)
        output.register_hook(lambda grad: arrivals.update([key]))

    trainable = [m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
    for module in trainable:
        module.register_forward_hook(count)
    engine.clipped_backward(loss64(model, make_batch("gpt2")))
    assert len(calls) == len(trainable)  # wte and the tied lm_head are two modules, each called once
    assert engine.tap_backward_calls == passes * len(calls)
    assert arrivals == Counter({key: passes for key in range(len(calls))})


def test_empty_batch_returns_no_norms_and_keeps_grads():
    model, _ = _bare("linear_3d")
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = [p.grad.clone() for p in model.parameters()]
    engine = BKEngine(model)
    norms = engine.clipped_backward(bare_loss(model, {"x": torch.zeros(0, SEQ, 5, dtype=torch.float64)}))
    assert norms.shape == (0,)
    for p, grad in zip(model.parameters(), before):
        assert torch.equal(p.grad, grad)


@pytest.mark.parametrize("method,options", [("lora", {"r": 4}), ("adapter", {"bottleneck": 4})])
def test_bf16_frozen_weights_with_fp32_trainables_match_fp32(method, options):
    # Both runs start from the same bf16-representable weights, so only activation rounding differs.
    torch.manual_seed(0)
    base = _gpt2(torch.float32).eval().to(torch.bfloat16).float()
    batch = make_batch("gpt2")
    runs = {}
    state = None
    for dtype in (torch.float32, torch.bfloat16):
        model = apply(copy.deepcopy(base).to(dtype), method, **options)
        assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
        if state is None:
            state = {n: t + 0.05 * torch.randn_like(t) for n, t in trainable_state_dict(model).items()}
        load_trainable_state_dict(model, state)
        engine = BKEngine(model)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        norms = engine.clipped_backward(per_example_loss(out.logits, batch["labels"]))
        runs[dtype] = norms, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    (norms32, grads32), (norms16, grads16) = runs[torch.float32], runs[torch.bfloat16]
    assert norms16.dtype == torch.float32
    torch.testing.assert_close(norms16, norms32, rtol=3e-2, atol=0)
    for name, grad in grads32.items():
        assert grads16[name].dtype == torch.float32
        torch.testing.assert_close(grads16[name], grad, rtol=0, atol=5e-2 * grad.abs().max().item())


def test_meta_device_runs_shapes_only():
    with torch.device("meta"):
        model = _gpt2(torch.float32)
        ids = torch.zeros(BATCH, SEQ, dtype=torch.long)
    engine = BKEngine(model)
    # No attention_mask: HF's mask builder calls .item() on it, which the meta device refuses.
    out = model(input_ids=ids)
    norms = engine.clipped_backward(per_example_loss(out.logits, ids))
    assert norms.shape == (BATCH,) and norms.device.type == "meta"
    for p in model.parameters():
        assert p.grad is not None and p.grad.shape == p.shape and p.grad.device.type == "meta"


# ---- what BK consumes --------------------------------------------------------------------------

def test_per_example_loss_keeps_float64():
    """Known bug (dpmemarc_core/losses.py): `.float()` casts float64 logits down to float32, so a float64
    BK run loses precision (RoBERTa classification misses the 1e-6 reference check by ~5x)."""
    logits = torch.randn(2, SEQ, VOCAB, dtype=torch.float64)
    labels = torch.randint(0, VOCAB, (2, SEQ))
    assert per_example_loss(logits, labels).dtype == torch.float64
    assert per_example_loss(logits[:, 0], labels[:, 0]).dtype == torch.float64


@pytest.mark.parametrize("rows,cols,seq_len,dtypes,factored", [
    (768, 3072, 128, "fp32", True),   # GPT-2 c_fc: 2.4M numbers > 2T² = 33k and > T·(768 + 3072) = 492k
    (768, 768, 128, "fp32", True),    # attention c_proj: 590k > 197k
    (768, 64, 128, "fp32", False),    # LoRA A at T=128: 49k > 2T², but ≤ T·(768 + 64) = 106k (a and g kept)
    (64, 2304, 128, "fp32", False),   # LoRA B at T=128: 147k ≤ T·(64 + 2304) = 303k
    (768, 64, 512, "fp32", False),    # LoRA A at T=512: 2T² = 524k (BK-MixOpt's rule)
    (96, 96, 128, "fp32", False),     # a small side-network layer: 9k ≤ 2T²
    (128, 1024, 128, "fp32", False),  # side up-projection, all fp32: 131k ≤ T·1152 = 147k
    (128, 1024, 128, "bf16", True),   # the same with bf16 a, g and an fp32 weight: 524 kB > 295 kB
])
def test_mixed_rule(rows, cols, seq_len, dtypes, factored):
    from dpmemarc_core.privacy.layers import GhostRule
    act = torch.bfloat16 if dtypes == "bf16" else torch.float32
    param = torch.empty(rows, cols)
    a, g = torch.empty(2, seq_len, rows, dtype=act), torch.empty(2, seq_len, cols, dtype=act)
    assert GhostRule("mixed", set())(param, a, g) is factored
    assert GhostRule("ghost", set())(param, a, g) is True
    assert GhostRule("instantiate", set())(param, a, g) is False
    assert GhostRule("instantiate", {id(param)})(param, a, g) is True  # used twice: cross terms need factors
