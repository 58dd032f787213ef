"""Export round trips: every method's folder loads back (with `load_pretrained`, and with peft or plain
transformers where the format is theirs) to a model with the same outputs, to 1e-5."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from test_bk_engine import LABELS, build, make_batch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from dpmemarc_core.methods import ModelSpec, load_pretrained, save_pretrained, trainable_state_dict
from dpmemarc_core.methods.pretrained import PEFT_FILES, TRAINABLE_FILE, build_model, export_state
from dpmemarc_core.models import load_model

OPTIONS = {"full": {}, "lora": {"r": 2}, "adapter": {"bottleneck": 2}, "bitfit": {}, "side": {"reduction": 2},
           "rev": {"r": 2}}
CASES = [(family, method) for family in ("bert", "gpt2", "llama") for method in OPTIONS
         if not (family == "llama" and method == "bitfit")]  # tiny Llama has no biases
PRIVACY = {"unit": "example", "sites": {"0": {"epsilon": 7.9, "delta": 1e-3, "noise_multiplier": 1.1, "steps": 32}}}


def kind_of(family: str) -> str:
    return "classification" if family == "bert" else "generation"


def saved_base(family: str, tmp_path) -> str:
    """The tiny backbone in float32 as a local model folder, as a hub name would be."""
    path = tmp_path / "base"
    build(family).float().save_pretrained(str(path))
    return str(path)


def spec_for(family: str, method: str, base: str, **extra) -> ModelSpec:
    classification = kind_of(family) == "classification"
    return ModelSpec(base_model=base, task_kind=kind_of(family), method=method,
                     num_labels=LABELS if classification else 0, method_options=OPTIONS[method], **extra)


def trained(spec: ModelSpec) -> torch.nn.Module:
    """The spec's model with every trainable tensor moved off its start (zero-initialised parts included)."""
    model = build_model(spec)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return model.eval()


def logits(model, family: str) -> torch.Tensor:
    batch = {k: v for k, v in make_batch(family).items() if k != "labels"}
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("family, method", CASES)
def test_load_pretrained_gives_the_exported_outputs(tmp_path, family, method):
    spec = spec_for(family, method, saved_base(family, tmp_path))
    model = trained(spec)
    out = save_pretrained(model, spec, tmp_path / "export", privacy=PRIVACY)
    again = load_pretrained(out)
    torch.testing.assert_close(logits(again, family), logits(model, family), rtol=0, atol=1e-5)
    assert json.loads((out / "privacy.json").read_text()) == PRIVACY
    files = {p.name for p in out.iterdir()}
    if method == "lora":
        assert set(PEFT_FILES) <= files
    elif method in ("adapter", "side", "rev"):
        assert TRAINABLE_FILE in files and set(load_file(str(out / TRAINABLE_FILE))) == set(
            trainable_state_dict(model))
    else:
        assert "config.json" in files and "model.safetensors" in files


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_peft_alone_loads_the_lora_export(tmp_path, family):
    base = saved_base(family, tmp_path)
    spec = spec_for(family, "lora", base)
    model = trained(spec)
    save_pretrained(model, spec, tmp_path / "adapter")
    plain = load_model(base, kind_of(family), LABELS)
    peft_model = PeftModel.from_pretrained(plain, str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(logits(peft_model, family), logits(model, family), rtol=0, atol=1e-5)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == base and config["r"] == 2


@pytest.mark.parametrize("family, method", [("bert", "full"), ("bert", "bitfit"), ("gpt2", "full"),
                                            ("gpt2", "bitfit")])
def test_transformers_alone_loads_full_and_bitfit_exports(tmp_path, family, method):
    spec = spec_for(family, method, saved_base(family, tmp_path), labels=("a", "b", "c") if family == "bert" else ())
    model = trained(spec)
    save_pretrained(model, spec, tmp_path / "model")
    auto = AutoModelForSequenceClassification if family == "bert" else AutoModelForCausalLM
    plain = auto.from_pretrained(str(tmp_path / "model")).eval()
    torch.testing.assert_close(logits(plain, family), logits(model, family), rtol=0, atol=1e-5)
    if family == "bert":
        assert plain.config.id2label == {0: "a", 1: "b", 2: "c"}


def test_export_state_loads_a_saved_trainable_state(tmp_path):
    spec = spec_for("bert", "lora", saved_base("bert", tmp_path))
    model = trained(spec)
    export_state(trainable_state_dict(model), spec, tmp_path / "out")
    torch.testing.assert_close(logits(load_pretrained(tmp_path / "out"), "bert"), logits(model, "bert"),
                               rtol=0, atol=1e-5)


def test_a_state_of_another_model_is_refused(tmp_path):
    spec = spec_for("bert", "lora", saved_base("bert", tmp_path))
    with pytest.raises(ValueError, match="does not fit"):
        export_state({"x": torch.zeros(1)}, spec, tmp_path / "out")


def test_an_export_replaces_an_earlier_one_but_never_other_files(tmp_path):
    spec = spec_for("bert", "adapter", saved_base("bert", tmp_path))
    model = trained(spec)
    save_pretrained(model, spec, tmp_path / "out")
    (tmp_path / "out" / "stale.txt").write_text("x")
    save_pretrained(model, spec, tmp_path / "out")
    assert not (tmp_path / "out" / "stale.txt").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="not an earlier export"):
        save_pretrained(model, spec, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_spec_checks_its_fields():
    with pytest.raises(ValueError, match="method must be one of"):
        ModelSpec(base_model="x", task_kind="generation", method="zo")
    with pytest.raises(ValueError, match="num_labels must be >= 2"):
        ModelSpec(base_model="x", task_kind="classification", method="lora", num_labels=1)
    with pytest.raises(ValueError, match="one name per class"):
        ModelSpec(base_model="x", task_kind="classification", method="lora", num_labels=3, labels=("a", "b"))


def test_load_pretrained_needs_an_export(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a dpmemarc export"):
        load_pretrained(tmp_path)
