"""The reversible network (`rev`): replayed backward, gradients, BK clipping, start point, memory, training.

Tiny float64 models of every family; the real-depth and real-model checks are in test_rev_replay.py."""

from __future__ import annotations

import math

import pytest
import torch
from bk_reference import assert_bk_matches_reference
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
from dpmemarc_core.methods.rev.coupling import ReversibleStack, default_segment_size
from dpmemarc_core.methods.rev.stack import apply_rev

VOCAB = 40
FAMILIES = ("gpt2", "bert", "roberta", "llama")


def build(family: str, layers: int = 2, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    common = dict(num_hidden_layers=layers, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                  vocab_size=VOCAB)
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=16,
                                           bos_token_id=0, eos_token_id=0,
                                           resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout))
    elif family == "bert":
        model = BertForSequenceClassification(BertConfig(**common, max_position_embeddings=16, num_labels=3,
                                                         hidden_dropout_prob=dropout,
                                                         attention_probs_dropout_prob=dropout))
    elif family == "roberta":
        model = RobertaForSequenceClassification(RobertaConfig(**common, max_position_embeddings=20, num_labels=3,
                                                               pad_token_id=1, hidden_dropout_prob=dropout,
                                                               attention_probs_dropout_prob=dropout))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=1, max_position_embeddings=16,
                                             tie_word_embeddings=True, attention_dropout=dropout))
    return model.double()


def batch_for(family: str) -> dict:
    """Three examples: full, right-padded, left-padded."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB, (3, 6), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    mask[2, :2] = 0
    if family in ("bert", "roberta"):
        labels = torch.tensor([0, 2, 1])
    else:
        labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_fn(model: nn.Module, batch: dict) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return per_example_loss(out.logits, batch["labels"])


def stack_of(model: nn.Module) -> ReversibleStack:
    return next(m for m in model.modules() if isinstance(m, ReversibleStack))


def reversible(family: str, layers: int = 2, dropout: float = 0.0, **options) -> nn.Module:
    """A rev model whose trainable parameters are moved off their zero start, so every gradient is non-trivial.

    Segments of two blocks unless asked otherwise, so every test replays a block (the default for two blocks
    would store both blocks' inputs and replay nothing)."""
    options.setdefault("segment_size", 2)
    model = apply_rev(build(family, layers, dropout), r=4, **options)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


# ---- the method's surface ------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_only_lora_adapters_and_head_train(family):
    model = apply_rev(build(family), r=4)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in names) and any(".adapter." in n for n in names)
    assert all("lora_" in n or ".adapter." in n or n.startswith("classifier.") for n in names), names
    assert any(n.startswith("classifier.") for n in names) == (family in ("bert", "roberta"))
    assert model.recommended_backward_passes == "auto"
    assert len(stack_of(model).blocks) == 2


@pytest.mark.parametrize("options, field", [({"r": 0}, "r"), ({"x1_factor": -0.1}, "x1_factor"),
                                            ({"x2_factor": 1.5}, "x2_factor"), ({"adapter_size": -1}, "adapter_size"),
                                            ({"lora_alpha": 0}, "lora_alpha"), ({"segment_size": 0}, "segment_size")])
def test_bad_options_name_the_field(options, field):
    with pytest.raises(ValueError, match=field):
        apply_rev(build("gpt2"), **options)


def test_refuses_unknown_family_and_second_application():
    with pytest.raises(ValueError, match="model_type"):
        apply_rev(nn.Linear(2, 2))
    model = apply_rev(build("gpt2"), r=4)
    with pytest.raises(ValueError, match="already"):
        apply_rev(model, r=4)


# ---- replay and gradients ------------------------------------------------------------------------

def record_streams(stack: ReversibleStack, monkeypatch) -> tuple[list, list]:
    """Test-only taps: every block's (x², y¹) as the forward and the replays compute them, and the (x², y¹)
    each backward step recomputes its sub-layers at."""
    computed, used = [], []
    couple, backward_step = stack.couple, stack.backward_step

    def recording_couple(block, x1, x2, call, randomness=None):
        y1, y2 = couple(block, x1, x2, call, randomness)
        computed.append((x2.clone(), y1.clone()))
        return y1, y2

    def recording_backward_step(block, x2, y1, *args):
        used.insert(0, (x2.clone(), y1.clone()))
        return backward_step(block, x2, y1, *args)

    monkeypatch.setattr(stack, "couple", recording_couple)
    monkeypatch.setattr(stack, "backward_step", recording_backward_step)
    return computed, used


@pytest.mark.parametrize("family", FAMILIES)
def test_backward_recomputes_at_the_forwards_exact_streams(family, monkeypatch):
    # Five blocks in segments of two (0-1, 2-3, 4): stored pairs, replayed blocks and a one-block top segment.
    model = reversible(family, layers=5, segment_size=2).float()
    stack = stack_of(model)
    computed, used = record_streams(stack, monkeypatch)
    loss_fn(model, batch_for(family)).sum().backward()
    forward, replayed = computed[:5], computed[5:]
    assert len(used) == 5 and len(replayed) == 2  # blocks 0 and 2 re-run; 1, 3, 4 start from stored tensors
    for (x2, y1), (u2, v1) in zip(forward, used):
        assert torch.equal(u2, x2) and torch.equal(v1, y1)  # bit for bit: nothing was inverted
    assert torch.equal(replayed[0][1], forward[2][1]) and torch.equal(replayed[1][1], forward[0][1])


def gradients(model: nn.Module, family: str, reversible_backward: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """Gradients of the summed loss for the input embeddings and every trainable parameter."""
    stack_of(model).reversible = reversible_backward
    model.zero_grad(set_to_none=True)
    batch = batch_for(family)
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_()
    torch.manual_seed(seed)
    logits = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
    per_example_loss(logits, batch["labels"]).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    grads["inputs_embeds"] = embeds.grad
    return grads


def assert_same_gradients(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name, ref in want.items():
        assert ref.abs().max() > 0, f"{name}: reference gradient is zero, the comparison would be empty"
        torch.testing.assert_close(got[name], ref, rtol=1e-7, atol=1e-10, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_reversible_gradients_equal_plain_autograd(family):
    model = reversible(family)
    assert_same_gradients(gradients(model, family, True), gradients(model, family, False))


def test_dropout_masks_are_replayed_in_the_backward():
    model = reversible("gpt2", dropout=0.2).train()
    got, want = gradients(model, "gpt2", True, seed=5), gradients(model, "gpt2", False, seed=5)
    assert_same_gradients(got, want)
    assert any((gradients(model, "gpt2", False, seed=6)[n] - want[n]).abs().max() > 1e-6 for n in want)


@pytest.mark.parametrize("segment_size", [1, 2, 3, 4])
def test_every_segment_size_keeps_gradients_exact(segment_size):
    model = reversible("llama", layers=4, segment_size=segment_size)
    assert stack_of(model).segment_starts() == list(range(0, 4, segment_size))
    assert_same_gradients(gradients(model, "llama", True), gradients(model, "llama", False))


def test_no_grad_forward_equals_the_reversible_forward():
    model = reversible("roberta")
    batch = batch_for("roberta")
    with torch.no_grad():
        plain = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                               plain, rtol=1e-12, atol=1e-12)


# ---- BK clipping through the reversible backward -------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backward_passes, clipping_mode", [(1, "mixed"), (1, "ghost"), (2, "mixed"), (2, "ghost"),
                                                            ("auto", "mixed"), ("auto", "ghost")])
def test_bk_matches_per_example_reference(family, backward_passes, clipping_mode):
    model = reversible(family)
    engine = assert_bk_matches_reference(model, batch_for(family), loss_fn, rtol=1e-6, max_grad_norm=1e-3,
                                         backward_passes=backward_passes, clipping_mode=clipping_mode)
    # Every LoRA and adapter layer of both blocks reported its g to the BK pass (the second of two
    # passes only back-propagates the reweighted loss: layers recomputed there are not booked).
    layers = sum(1 for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.weight.requires_grad
                 and not n.startswith("classifier"))
    assert engine.tap_backward_calls >= layers


@pytest.mark.parametrize("budget, passes_run", [(0.0, 2), (0.05, 2), (1e9, 1)])
def test_auto_passes_keep_within_budget_else_finish_as_two(monkeypatch, budget, passes_run):
    # 0: over budget at the first layer; 0.05: over budget after some layers kept theirs (reduced then);
    # 1e9: everything kept, one pass. Each must equal the reference.
    import dpmemarc_core.privacy.engine as engine_module

    reduced_books = []
    reduce_kept = engine_module.BKEngine._reduce_kept

    def recording(engine):
        reduced_books.append(sum(1 for b in engine._books.values() if b.kept_squared_norm() is not None))
        reduce_kept(engine)

    monkeypatch.setattr(engine_module, "KEEP_BUDGET_TENSORS", budget)
    monkeypatch.setattr(engine_module.BKEngine, "_reduce_kept", recording)
    model = reversible("gpt2")
    engine = assert_bk_matches_reference(model, batch_for("gpt2"), loss_fn, rtol=1e-6, max_grad_norm=1e-3,
                                         backward_passes="auto", clipping_mode="mixed")
    assert engine.last_backward_passes == passes_run
    assert len(reduced_books) == (passes_run == 2)
    if budget == 0.05:
        assert reduced_books[0] > 1, "the budget should run out after several layers kept their buffers"


# ---- start point ---------------------------------------------------------------------------------

def relative_logit_change(family: str, **options) -> float:
    batch = batch_for(family)
    model = build(family)
    with torch.no_grad():
        before = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        after = apply_rev(model, r=4, **options)(input_ids=batch["input_ids"],
                                                 attention_mask=batch["attention_mask"]).logits
    keep = batch["attention_mask"].bool() if before.dim() == 3 else slice(None)
    return ((after - before)[keep].norm() / before[keep].norm()).item()


@pytest.mark.parametrize("family", FAMILIES)
def test_start_point_approaches_the_pretrained_model_linearly_in_the_factors(family):
    # The coupling differs from the pretrained block by λ(x¹ − x²) and β(x² − y¹): O(λ + β).
    coarse = relative_logit_change(family, x1_factor=1e-2, x2_factor=1e-2)
    fine = relative_logit_change(family, x1_factor=1e-4, x2_factor=1e-4)
    assert coarse > 0
    assert 0.003 < fine / coarse < 0.03
    assert relative_logit_change(family) < 1.0  # MEFT's λ = β = 0.1: close, not equal


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_factors_start_at_the_pretrained_model_and_still_train(family):
    # Nothing divides by λ or β any more, so 0 is a valid choice: y¹ = attn_sublayer(x²), y² = mlp_sublayer(y¹).
    assert relative_logit_change(family, x1_factor=0, x2_factor=0) < 1e-14
    model = reversible(family, x1_factor=0, x2_factor=0)
    assert_same_gradients(gradients(model, family, True), gradients(model, family, False))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_residual_hand_over_starts_closer_than_meft_full_residual(family, monkeypatch):
    compensated = relative_logit_change(family)
    # MEFT's own F and G: the sub-layers with their whole residual, no −λx / −βy hand-over.
    monkeypatch.setattr(ReversibleStack, "f", lambda self, block, x, call: self.attention(block, x, call))
    monkeypatch.setattr(ReversibleStack, "g", lambda self, block, y, call: self.mlp(block, y, call))
    assert compensated < relative_logit_change(family)


# ---- memory ----------------------------------------------------------------------------------------

def saved_by_forward(model: nn.Module, family: str) -> tuple[int, int]:
    """Tensors (and their bytes) autograd keeps for backward after one training forward."""
    count, size = 0, 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal count, size
        count += 1
        size += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn(model, batch_for(family)).sum()
    return count, size


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_forward_keeps_one_stream_pair_per_segment(family):
    # Saved for backward: the top block's y¹ and one (x¹, x²) pair per segment (the stack's input twice for the
    # first); everything else the model saves does not depend on the depth.
    counts = {}
    for layers, segments in ((4, 2), (9, 3), (16, 4)):
        model = reversible(family, layers=layers, segment_size=None)
        assert len(stack_of(model).segment_starts()) == segments
        counts[layers] = saved_by_forward(model, family)
    stream = 3 * 6 * 16 * 8  # one [batch, seq, hidden] float64 stream
    assert counts[9][0] - counts[4][0] == counts[16][0] - counts[9][0] == 2
    assert counts[16][1] - counts[4][1] == 4 * stream
    model = reversible(family, layers=16, segment_size=None)
    stack_of(model).reversible = False
    assert saved_by_forward(model, family)[0] > 10 * counts[16][0]  # plain autograd keeps every block's


def test_default_segment_size_keeps_the_fewest_streams_and_replays_the_fewest_blocks():
    # Live streams ~ 2·⌈L/k⌉ stored + 2·(k − 1) replayed; of the k that minimise it, the smallest.
    for layers in range(1, 101):
        k = default_segment_size(layers)
        best = min(math.ceil(layers / j) + j for j in range(1, layers + 1))
        assert math.ceil(layers / k) + k == best and all(math.ceil(layers / j) + j > best for j in range(1, k))
    assert [default_segment_size(n) for n in (2, 6, 12, 24, 30, 36, 96)] == [1, 2, 3, 4, 5, 6, 8]
    assert stack_of(apply_rev(build("gpt2", 12), r=4)).segment_starts() == [0, 3, 6, 9]
    assert stack_of(apply_rev(build("gpt2", 3), r=4, segment_size=5)).segment_starts() == [0]


def test_meta_device_step_with_two_pass_bk():
    from dpmemarc_core.privacy import BKEngine

    with torch.device("meta"):
        model = apply_rev(build("llama").float(), r=4)
    ids = torch.randint(2, VOCAB, (3, 6)).to("meta")
    engine = BKEngine(model, backward_passes=model.recommended_backward_passes)
    norms = engine.clipped_backward(per_example_loss(model(input_ids=ids).logits, ids))
    assert norms.shape == (3,) and norms.device.type == "meta"
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in model.parameters() if p.requires_grad)


# ---- training ----------------------------------------------------------------------------------------

def test_tiny_training_run_lowers_the_loss():
    model = apply_rev(build("bert"), r=4).train()
    batch = batch_for("bert")
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = loss_fn(model, batch).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0]
    # The zero-initialised halves (LoRA B, adapter up) moved: the backbone part trained, not only the head.
    assert all(p.abs().max() > 0 for n, p in model.named_parameters() if "lora_B" in n or ".adapter.up." in n)
