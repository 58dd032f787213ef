"""`apply`, the baseline methods' trainable sets and options, and the trainable-state round trip."""

from __future__ import annotations

import copy

import pytest
import torch
from test_bk_engine import build, make_batch
from torch import nn

from dpmemarc_core.methods import apply, load_trainable_state_dict, trainable_state_dict

FAMILIES = ("gpt2", "bert", "roberta", "llama")
LAYERS = 2
PEFT_PREFIX = "base_model.model."

# Written out by hand (not derived from the package's placement table) so the test can disagree with it.
ATTENTION = {"gpt2": ["transformer.h.{}.attn.c_attn"],
             "bert": ["bert.encoder.layer.{}.attention.self.query", "bert.encoder.layer.{}.attention.self.value"],
             "roberta": ["roberta.encoder.layer.{}.attention.self.query",
                         "roberta.encoder.layer.{}.attention.self.value"],
             "llama": ["model.layers.{}.self_attn.q_proj", "model.layers.{}.self_attn.v_proj"]}
MLP = {"gpt2": ["transformer.h.{}.mlp.c_fc", "transformer.h.{}.mlp.c_proj"],
       "bert": ["bert.encoder.layer.{}.intermediate.dense", "bert.encoder.layer.{}.output.dense"],
       "llama": ["model.layers.{}.mlp.gate_proj", "model.layers.{}.mlp.up_proj", "model.layers.{}.mlp.down_proj"]}
ADAPTED = {"gpt2": ["transformer.h.{}.attn.c_proj", "transformer.h.{}.mlp.c_proj"],
           "bert": ["bert.encoder.layer.{}.attention.output.dense", "bert.encoder.layer.{}.output.dense"],
           "roberta": ["roberta.encoder.layer.{}.attention.output.dense", "roberta.encoder.layer.{}.output.dense"],
           "llama": ["model.layers.{}.self_attn.o_proj", "model.layers.{}.mlp.down_proj"]}


def _paths(templates: list[str]) -> set[str]:
    return {t.format(i) for t in templates for i in range(LAYERS)}


def _trainable(model: nn.Module) -> set[str]:
    return {n.removeprefix(PEFT_PREFIX) for n, p in model.named_parameters() if p.requires_grad}


def _head_params(family: str) -> set[str]:
    model = build(family)
    return {n for n, _ in model.named_parameters() if n.startswith("classifier.")}


def _split_head(names: set[str]) -> tuple[set[str], set[str]]:
    head = {n for n in names if n.startswith("classifier.")}
    return names - head, head


def _owners(names: set[str], marker: str) -> set[str]:
    """Module paths owning the parameters whose name contains `.marker.` (e.g. lora_A)."""
    return {n.split(f".{marker}.")[0] for n in names if f".{marker}." in n}


# ---- trainable sets ----------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_full_trains_everything(family):
    model = apply(build(family), "full")
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("include_mlp", [False, True])
@pytest.mark.parametrize("family", ["gpt2", "bert", "llama"])
def test_lora_trains_only_its_factors_and_the_head(family, include_mlp):
    model = apply(build(family), "lora", r=4, include_mlp=include_mlp)
    body, head = _split_head(_trainable(model))
    assert all(".lora_A." in n or ".lora_B." in n for n in body)
    expected = _paths(ATTENTION[family] + (MLP[family] if include_mlp else []))
    assert _owners(body, "lora_A") == expected and _owners(body, "lora_B") == expected
    if family == "bert":  # peft trains a copy of the head and keeps the original frozen
        assert head == {n.replace("classifier.", "classifier.modules_to_save.default.") for n in _head_params(family)}
    else:
        assert head == set()


def test_lora_roberta_head_is_a_trainable_copy_of_both_layers():
    model = apply(build("roberta"), "lora", r=4)
    _, head = _split_head(_trainable(model))
    assert head == {n.replace("classifier.", "classifier.modules_to_save.default.") for n in _head_params("roberta")}
    assert _owners(_trainable(model), "lora_A") == _paths(ATTENTION["roberta"])


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_trains_only_adapters_and_the_head(family):
    model = apply(build(family), "adapter", bottleneck=4)
    body, head = _split_head(_trainable(model))
    assert _owners(body, "adapter") == _paths(ADAPTED[family])
    assert all(".adapter." in n for n in body)
    assert head == _head_params(family)


@pytest.mark.parametrize("family", ["gpt2", "bert", "roberta", "llama_bias"])
def test_bitfit_trains_every_backbone_bias_and_the_head(family):
    biases = {n for n, _ in build(family).named_parameters() if n.endswith(".bias")}
    model = apply(build(family), "bitfit")
    body, head = _split_head(_trainable(model))
    assert body == {n for n in biases if not n.startswith("classifier.")}
    assert any("LayerNorm" in n or "ln_" in n for n in body) or family == "llama_bias"
    assert head == _head_params(family.removesuffix("_bias"))


def test_bitfit_refuses_a_model_without_biases():
    with pytest.raises(ValueError, match=r"^bitfit needs bias terms; LlamaForCausalLM has none$"):
        apply(build("llama"), "bitfit")


# ---- forward behaviour ----------------------------------------------------------------------------

@pytest.mark.parametrize("method,options", [("lora", {"r": 4, "include_mlp": True}), ("adapter", {"bottleneck": 4})])
@pytest.mark.parametrize("family", FAMILIES)
def test_zero_initialised_methods_leave_the_output_unchanged(family, method, options):
    original = build(family)
    batch = make_batch(family)
    model = apply(copy.deepcopy(original), method, **options)
    with torch.no_grad():
        before, after = original(**batch), model(**batch)
    torch.testing.assert_close(after.logits, before.logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(after.loss, before.loss, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["full", "lora", "adapter", "bitfit"])
@pytest.mark.parametrize("family", ["gpt2", "roberta", "llama_bias"])
def test_applied_model_is_called_like_the_original(family, method):
    model = apply(build(family), method)
    batch = make_batch(family)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    assert out.logits.shape[0] == batch["input_ids"].shape[0]
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# ---- options --------------------------------------------------------------------------------------

def test_lora_options_reach_peft():
    model = apply(build("bert"), "lora", r=3, lora_alpha=12, target_modules=["key"])
    layer = model.base_model.model.bert.encoder.layer[1].attention.self.key
    assert layer.lora_A["default"].weight.shape == (3, 16)
    assert layer.scaling["default"] == 12 / 3
    assert _owners(_trainable(model), "lora_A") == {f"bert.encoder.layer.{i}.attention.self.key" for i in range(2)}


def test_lora_defaults_follow_the_paper():
    model = apply(build("llama"), "lora")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.shape[0] == 64
    assert layer.scaling["default"] == 1.0
    assert isinstance(layer.lora_dropout["default"], nn.Identity)


def test_adapter_options_shape_the_adapter():
    model = apply(build("llama"), "adapter", bottleneck=3, activation="relu")
    adapter = model.model.layers[0].mlp.down_proj.adapter
    assert adapter.down.weight.shape == (3, 16) and adapter.up.weight.shape == (16, 3)
    assert isinstance(adapter.act, nn.ReLU)
    assert adapter.down.weight.dtype == torch.float64


def test_adapter_parameters_stay_fp32_on_a_bf16_backbone():
    model = apply(build("gpt2").to(torch.bfloat16), "adapter", bottleneck=4)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    batch = make_batch("gpt2")
    assert model(input_ids=batch["input_ids"]).logits.dtype == torch.bfloat16


@pytest.mark.parametrize("method,options,message", [
    ("lora", {"rank": 4}, r"\['rank'\]; accepted: r, lora_alpha, lora_dropout, target_modules, include_mlp$"),
    ("adapter", {"r": 4, "bottleneck": 2}, r"\['r'\]; accepted: bottleneck, activation$"),
    ("full", {"r": 4}, r"\['r'\]; accepted: none$"),
    ("bitfit", {"bottleneck": 4}, r"\['bottleneck'\]; accepted: none$"),
])
def test_unknown_options_are_refused_with_the_accepted_ones(method, options, message):
    with pytest.raises(ValueError, match=message):
        apply(build("gpt2"), method, **options)


def test_unknown_method_is_refused_with_the_accepted_ones():
    with pytest.raises(ValueError, match=r"'prefix'.*full, lora, adapter, bitfit, side, rev"):
        apply(build("gpt2"), "prefix")


@pytest.mark.parametrize("method,options,field", [
    ("lora", {"r": 0}, "r must be"), ("lora", {"r": 2.5}, "r must be"), ("lora", {"r": True}, "r must be"),
    ("lora", {"lora_alpha": 0}, "lora_alpha"), ("lora", {"lora_alpha": float("inf")}, "lora_alpha"),
    ("lora", {"lora_dropout": 1.0}, "lora_dropout"), ("lora", {"lora_dropout": -0.1}, "lora_dropout"),
    ("lora", {"include_mlp": "yes"}, "include_mlp"), ("lora", {"target_modules": []}, "target_modules"),
    ("lora", {"target_modules": ["c_fc"], "include_mlp": True}, "not both"),
    ("adapter", {"bottleneck": 0}, "bottleneck"), ("adapter", {"activation": "swish"}, "activation"),
])
def test_bad_option_values_are_refused(method, options, field):
    with pytest.raises(ValueError, match=field):
        apply(build("gpt2"), method, **options)


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_a_model_without_known_layout_is_refused(method):
    with pytest.raises(ValueError, match="supported: gpt2, bert, roberta, llama"):
        apply(nn.Sequential(nn.Linear(2, 2)), method)


def test_apply_needs_a_module():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        apply({"weight": torch.zeros(1)}, "full")


# ---- trainable state ------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["full", "lora", "adapter", "bitfit"])
def test_state_holds_detached_cpu_copies_of_the_trainables(method):
    model = apply(build("roberta"), method)
    state = trainable_state_dict(model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert list(state) == list(params)
    for name, tensor in state.items():
        assert tensor.device.type == "cpu" and not tensor.requires_grad
        assert torch.equal(tensor, params[name]) and tensor.data_ptr() != params[name].data_ptr()
    assert list(trainable_state_dict(apply(build("roberta", seed=5), method))) == list(state)  # stable names


def test_tied_head_is_listed_once():
    state = trainable_state_dict(apply(build("gpt2"), "full"))
    assert "transformer.wte.weight" in state and "lm_head.weight" not in state


@pytest.mark.parametrize("method", ["full", "lora", "adapter", "bitfit"])
def test_state_moves_a_trained_part_between_models(method):
    source = apply(build("gpt2", seed=0), method)
    with torch.no_grad():
        for p in source.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    target = apply(build("gpt2", seed=0), method)
    load_trainable_state_dict(target, trainable_state_dict(source))
    for (name, got), want in zip(trainable_state_dict(target).items(), trainable_state_dict(source).values()):
        assert torch.equal(got, want), name
    batch = make_batch("gpt2")
    with torch.no_grad():
        torch.testing.assert_close(target(**batch).logits, source(**batch).logits, rtol=0, atol=0)


def _corrupt(state: dict, kind: str) -> tuple[dict, str]:
    second = list(state)[1]
    bad = dict(state)
    if kind == "missing":
        del bad[second]
        return bad, rf"missing '{second}'"
    if kind == "unexpected":
        bad["classifier.extra.weight"] = torch.zeros(1, dtype=torch.float64)
        return bad, r"unexpected 'classifier.extra.weight'"
    if kind == "shape":
        bad[second] = torch.zeros(*state[second].shape, 2, dtype=torch.float64)
        return bad, rf"'{second}' has shape .* expected"
    if kind == "dtype":
        bad[second] = state[second].float()
        return bad, rf"'{second}' has dtype torch.float32, expected torch.float64"
    bad[second] = state[second].tolist()
    return bad, rf"'{second}' is a list, not a tensor"


@pytest.mark.parametrize("kind", ["missing", "unexpected", "shape", "dtype", "not_a_tensor"])
def test_a_state_that_does_not_fit_is_refused_and_nothing_changes(kind):
    model = apply(build("bert"), "lora", r=2)
    before = trainable_state_dict(model)
    state, message = _corrupt(before, kind)
    first = next(iter(state))
    state[first] = state[first] + 1  # valid on its own: must not be written either
    with pytest.raises(ValueError, match=message):
        load_trainable_state_dict(model, state)
    for name, tensor in trainable_state_dict(model).items():
        assert torch.equal(tensor, before[name]), name


def test_state_must_be_a_mapping():
    model = apply(build("gpt2"), "bitfit")
    with pytest.raises(ValueError, match="mapping"):
        load_trainable_state_dict(model, list(trainable_state_dict(model).values()))
