"""Mean pooling of BERT-style classifiers (dpmemarc_core.pooling): what it computes, that methods and saving keep
it, and the side network's mean over its own states."""

import json

import torch
from transformers import BertConfig, BertForSequenceClassification

from dpmemarc_core import models
from dpmemarc_core.methods import apply
from dpmemarc_core.methods.side.model import pool
from dpmemarc_core.pooling import declares_mean_pooling, is_mean_pooled, use_mean_pooling

CONFIG = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
              max_position_embeddings=32, num_labels=2)


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(**CONFIG)).eval()


def test_logits_read_the_masked_mean_of_the_token_states():
    model = use_mean_pooling(tiny_bert())
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        states = model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        mean = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        torch.testing.assert_close(logits, model.classifier(mean))
        # Padding does not change an example's prediction, and no mask is kept after the forward.
        torch.testing.assert_close(model(input_ids=ids[1:, :2], attention_mask=mask[1:, :2]).logits, logits[1:])
    assert model.bert.pooler.mask is None and is_mean_pooled(model)


def test_saved_model_and_methods_keep_mean_pooling(tmp_path):
    model = use_mean_pooling(tiny_bert())
    model.save_pretrained(tmp_path / "saved")
    reloaded = models.load_model(str(tmp_path / "saved"), "classification")
    assert is_mean_pooled(reloaded)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(input_ids=ids).logits, model(input_ids=ids).logits)
    lora = apply(use_mean_pooling(tiny_bert()), "lora", r=1)
    assert is_mean_pooled(lora.base_model.model)


def test_only_declared_sentence_encoders_are_mean_pooled(tmp_path):
    assert not declares_mean_pooling(tmp_path)
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    assert declares_mean_pooling(tmp_path)
    tiny_bert().save_pretrained(tmp_path / "plain")
    assert not is_mean_pooled(models.load_model(str(tmp_path / "plain"), "classification"))


def test_side_pool_mean_over_real_tokens():
    states = torch.arange(24, dtype=torch.float32).view(2, 3, 4)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    torch.testing.assert_close(pool(states, mask, first_token=True, mean=True),
                               torch.stack([states[0].mean(0), states[1, 0]]))
