"""Side network (`side`): frozen backbone without a graph, BK through the side network, padding, pruning init."""

from __future__ import annotations

import pytest
import torch
from bk_reference import assert_bk_matches_reference, clipped_reference
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
)
from transformers.activations import ACT2FN

from dpmemarc_core.losses import per_example_loss
from dpmemarc_core.methods.side.families import read_family
from dpmemarc_core.methods.side.init import plan_pruning
from dpmemarc_core.methods.side.model import apply_side, pool
from dpmemarc_core.methods.side.network import allowed_keys
from dpmemarc_core.models import FUSED_ACTIVATIONS

VOCAB, HIDDEN, FFN, LABELS, REDUCTION = 61, 32, 96, 3, 4
PAD = 1


def _backbone(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name in ("gpt2", "gpt2-cls"):
        config = GPT2Config(n_layer=2, n_embd=HIDDEN, n_head=2, n_inner=FFN, vocab_size=VOCAB, n_positions=16,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, num_labels=LABELS, pad_token_id=PAD,
                            bos_token_id=0, eos_token_id=0)
        model = GPT2LMHeadModel(config) if name == "gpt2" else GPT2ForSequenceClassification(config)
    elif name in ("bert", "roberta"):
        kwargs = dict(num_hidden_layers=2, hidden_size=HIDDEN, num_attention_heads=2, intermediate_size=FFN,
                      vocab_size=VOCAB, max_position_embeddings=24, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, num_labels=LABELS, pad_token_id=PAD)
        model = (BertForSequenceClassification(BertConfig(**kwargs)) if name == "bert"
                 else RobertaForSequenceClassification(RobertaConfig(**kwargs)))
    else:
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=HIDDEN, num_attention_heads=4,
                                             num_key_value_heads=2, intermediate_size=FFN, vocab_size=VOCAB,
                                             pad_token_id=PAD, bos_token_id=0, eos_token_id=0))
    return model.double().eval()


def _side(name: str, perturb: bool = True) -> torch.nn.Module:
    model = apply_side(_backbone(name), reduction=REDUCTION)
    if perturb:
        # The pruned init leaves the up-projection at zero and the gates at 0.5: move every side weight so
        # that every parameter carries gradient and the side network changes the output.
        with torch.no_grad():
            for p in model.side.parameters():
                p.add_(0.3 * torch.randn_like(p))
    return model


def _is_generation(name: str) -> bool:
    return name in ("gpt2", "llama")


def _batch(name: str, batch: int = 3, length: int = 7) -> dict:
    torch.manual_seed(1)
    ids = torch.randint(2, VOCAB, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, 4:] = 0  # right padding
    mask[1, 6:] = 0
    ids[mask == 0] = PAD
    if _is_generation(name):
        labels = ids.masked_fill(mask == 0, -100)
    else:
        labels = torch.randint(0, LABELS, (batch,))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return per_example_loss(out.logits, batch["labels"])


ALL = ["gpt2", "gpt2-cls", "bert", "roberta", "llama"]
DISTINCT = ["gpt2", "gpt2-cls", "bert", "llama"]  # RoBERTa shares BERT's side code: kept to shapes and padding


@pytest.mark.parametrize("name", DISTINCT)
def test_only_side_is_trainable_and_backbone_has_no_graph(name):
    model = _side(name)
    backbone = model.backbone
    assert all(not p.requires_grad for p in backbone.parameters())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("side.") for n in trainable)
    assert trainable == {f"side.{n}" for n, _ in model.side.named_parameters()}

    batch = _batch(name)
    states, last = model.backbone_states(batch["input_ids"], batch["attention_mask"])
    assert len(states) == len(read_family(backbone).layers) + 1
    assert all(not s.requires_grad and s.grad_fn is None for s in states + [last])

    # Nothing backbone-internal is saved for backward: its MLP activations (last dim FFN) would be.
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        loss = _loss(model, batch).mean()
    assert saved and not any(shape and shape[-1] == FFN for shape in saved)
    loss.backward()
    assert all(p.grad is None for p in backbone.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.side.parameters())


@pytest.mark.parametrize("name", ALL)
def test_output_shapes(name):
    model = _side(name, perturb=False)
    batch = _batch(name, batch=2, length=5)
    out = model(**batch)
    expected = (2, 5, VOCAB) if _is_generation(name) else (2, LABELS)
    assert out.logits.shape == expected
    torch.testing.assert_close(out.loss, per_example_loss(out.logits, batch["labels"]).mean())


def test_generation_starts_at_the_backbone():
    # Zero up-projection: the untrained side network leaves the language model exactly as it was.
    model = _side("llama", perturb=False)
    batch = _batch("llama")
    with torch.no_grad():
        expected = model.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(model(**batch).logits, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", DISTINCT)
@pytest.mark.parametrize("mode", ["mixed", "ghost"])
def test_bk_matches_float64_reference(name, mode):
    model = _side(name)
    batch = _batch(name)
    # Clip at the median per-example norm so that some examples are clipped and some are not.
    norms, _ = clipped_reference(model, batch, _loss, 1.0)
    engine = assert_bk_matches_reference(model, batch, _loss, rtol=1e-6, clipping_mode=mode,
                                         max_grad_norm=norms.median().item())
    assert engine.tap_backward_calls > 0


@pytest.mark.parametrize("name", ALL)
def test_padding_contributes_nothing(name):
    model = _side(name)
    torch.manual_seed(2)
    real = torch.randint(2, VOCAB, (1, 5))
    junk = torch.randint(2, VOCAB, (1, 4))  # arbitrary tokens under a zero mask: must not matter
    padded = torch.cat([real, junk], dim=1)
    mask = torch.cat([torch.ones(1, 5, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)], dim=1)
    with torch.no_grad():
        short = model(input_ids=real, attention_mask=torch.ones_like(real)).logits
        long = model(input_ids=padded, attention_mask=mask).logits
    if _is_generation(name):
        long = long[:, :5]
    torch.testing.assert_close(long, short, rtol=1e-9, atol=1e-9)


def test_decoder_classification_reads_the_last_real_token_with_left_padding():
    model = _side("gpt2-cls")
    real = torch.randint(2, VOCAB, (1, 5))
    ids = torch.cat([torch.full((1, 3), PAD), real], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 5, dtype=torch.long)], dim=1)
    with torch.no_grad():
        model.side.up.weight.normal_()  # not the zero start: the side state must reach the logits
        states, final = model.backbone_states(ids, mask)
        side = model.side(states, allowed_keys(mask, 1, 8, causal=True, device=ids.device))
        logits = model(input_ids=ids, attention_mask=mask).logits
        expected = model.side.classifier(final[:, -1] + model.side.up(side[:, -1]))
    torch.testing.assert_close(pool(side, mask, first_token=False), side[:, -1])
    assert torch.isfinite(side).all()  # padded queries with no real key to their left stay finite
    torch.testing.assert_close(logits, expected)


@pytest.mark.parametrize("name", ["bert", "roberta", "gpt2-cls"])
def test_classification_is_the_papers_sum_of_backbone_and_side(name):
    # y = classifier(pool(h_L + up(s))) (eq. 6); with up at its zero start, the backbone's pooled state alone.
    model = _side(name, perturb=False)
    ids = torch.randint(2, VOCAB, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    with torch.no_grad():
        states, final = model.backbone_states(ids, mask)
        start = model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(start, model.side.classifier(model._pool(final, mask)))
        model.side.up.weight.normal_()
        side = model.side(states, allowed_keys(mask, 2, 6, causal=model.family.causal, device=ids.device))
        summed = model.side.classifier(model._pool(final + model.side.up(side), mask))
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, summed)
        assert not torch.allclose(summed, start)


def test_pruning_copies_backbone_sub_blocks_gpt2():
    backbone = _backbone("gpt2")
    plan = plan_pruning(read_family(backbone), REDUCTION)
    model = apply_side(backbone, reduction=REDUCTION)
    width, head_dim = HIDDEN // REDUCTION, HIDDEN // 2

    # Residual dimensions: the embedding columns of largest L1 norm.
    norms = backbone.transformer.wte.weight.abs().sum(0)
    assert plan.hidden.tolist() == sorted(norms.argsort(descending=True)[:width].tolist())
    hidden = plan.hidden

    block, side = backbone.transformer.h[1], model.side.blocks[1]
    w_qkv = block.attn.c_attn.weight  # Conv1D: (in, out), q | k | v along out
    w_q, w_k, w_v = (w_qkv[:, i * HIDDEN:(i + 1) * HIDDEN].t() for i in range(3))
    w_o = block.attn.c_proj.weight.t()
    kept = plan.attention[1]
    # Heads stay heads: each head keeps head_dim / r of its own channels.
    assert ((kept.view(2, -1) // head_dim) == torch.arange(2)[:, None]).all()
    score = (w_q[:, hidden].abs().sum(1) + w_k[:, hidden].abs().sum(1) + w_v[:, hidden].abs().sum(1)
             + w_o[hidden].abs().sum(0))
    for head in range(2):
        channels = set(range(head * head_dim, (head + 1) * head_dim))
        chosen = set(kept.tolist()) & channels
        assert min(score[list(chosen)]) >= max(score[list(channels - chosen)])
    torch.testing.assert_close(side.q.weight, w_q[kept][:, hidden], rtol=0, atol=0)
    torch.testing.assert_close(side.q.bias, block.attn.c_attn.bias[kept], rtol=0, atol=0)
    torch.testing.assert_close(side.v.weight, w_v[kept][:, hidden], rtol=0, atol=0)
    torch.testing.assert_close(side.o.weight, w_o[hidden][:, kept], rtol=0, atol=0)
    ffn = plan.ffn[1]
    assert len(ffn) == FFN // REDUCTION
    torch.testing.assert_close(side.fc_in.weight, block.mlp.c_fc.weight.t()[ffn][:, hidden], rtol=0, atol=0)
    torch.testing.assert_close(side.fc_out.weight, block.mlp.c_proj.weight.t()[hidden][:, ffn], rtol=0, atol=0)
    torch.testing.assert_close(side.attn_norm.weight, block.ln_1.weight[hidden], rtol=0, atol=0)
    torch.testing.assert_close(model.side.final_norm.bias, backbone.transformer.ln_f.bias[hidden], rtol=0, atol=0)
    # Down-projections start as the selection of the kept dimensions.
    x = torch.randn(2, 3, HIDDEN, dtype=torch.float64)
    torch.testing.assert_close(model.side.downs[0](x), x[..., hidden], rtol=0, atol=0)


def test_pruning_pairs_grouped_key_values_llama():
    backbone = _backbone("llama")
    plan = plan_pruning(read_family(backbone), REDUCTION)
    model = apply_side(backbone, reduction=REDUCTION)
    head_dim = HIDDEN // 4  # 4 query heads share 2 key/value heads
    attn, side = backbone.model.layers[0].self_attn, model.side.blocks[0]
    kept, hidden = plan.attention[0], plan.hidden
    heads = kept // head_dim
    expected_kv = (heads // 2) * head_dim + kept % head_dim
    assert plan.key_value[0].tolist() == expected_kv.tolist()
    torch.testing.assert_close(side.k.weight, attn.k_proj.weight[expected_kv][:, hidden], rtol=0, atol=0)
    torch.testing.assert_close(side.q.weight, attn.q_proj.weight[kept][:, hidden], rtol=0, atol=0)
    mlp = backbone.model.layers[0].mlp
    torch.testing.assert_close(side.fc_gate.weight, mlp.gate_proj.weight[plan.ffn[0]][:, hidden], rtol=0, atol=0)
    assert isinstance(side.attn_norm, torch.nn.RMSNorm)


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_a_few_adam_steps_reduce_the_loss(name):
    model = _side(name, perturb=False)
    batch = _batch(name, batch=4, length=6)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_meta_device_forward_and_backward():
    # Eager backbone attention: HF's sdpa mask builder itself reads mask values (.item()) to pick a fast path.
    with torch.device("meta"):
        backbone = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=HIDDEN, num_attention_heads=4,
                                                num_key_value_heads=2, intermediate_size=FFN, vocab_size=VOCAB,
                                                attn_implementation="eager"))
        model = apply_side(backbone, reduction=REDUCTION)
        ids = torch.zeros(2, 5, dtype=torch.long)
        out = model(input_ids=ids, attention_mask=torch.ones(2, 5, dtype=torch.long), labels=ids)
    assert out.logits.device.type == "meta" and out.logits.shape == (2, 5, VOCAB)
    out.loss.backward()
    assert model.side.up.weight.grad.device.type == "meta"


@pytest.mark.parametrize("name", ["gpt2", "roberta"])
def test_states_are_kept_in_the_autocast_dtype(name):
    # Under autocast the down-projections compute in bf16: the states they read are kept as bf16 (a post-norm
    # backbone hands on fp32 layer outputs), never as fp32 copies, and the side network still trains.
    model = _side(name).float()
    batch = _batch(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        states, _ = model.backbone_states(batch["input_ids"], batch["attention_mask"])
        loss = _loss(model, batch).sum()
    assert {s.dtype for s in states} == {torch.bfloat16}
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.side.parameters())


def test_fused_activation_is_the_backbone_function():
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    for written_out, fused in FUSED_ACTIVATIONS.items():
        torch.testing.assert_close(ACT2FN[fused](x), ACT2FN[written_out](x), rtol=1e-12, atol=1e-12)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="reduction"):
        apply_side(_backbone("gpt2"), reduction=5)
    with pytest.raises(ValueError, match="unknown option"):
        apply_side(_backbone("gpt2"), reduction=4, gate="fixed")
    with pytest.raises(TypeError, match="not supported"):
        apply_side(torch.nn.Linear(2, 2))
