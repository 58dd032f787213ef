"""A classifier head's own learning rate (train.parameter_groups) under every way a method holds the head."""

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from dpmemarc_core.methods import apply
from dpmemarc_core.training.bk import parameter_groups

CONFIG = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
              max_position_embeddings=32, num_labels=2)


@pytest.mark.parametrize("method, options", [("lora", {"r": 1}), ("bitfit", {}), ("side", {"reduction": 2})])
def test_head_parameters_get_the_head_rate(method, options):
    torch.manual_seed(0)
    model = apply(BertForSequenceClassification(BertConfig(**CONFIG)), method, **options)
    rest, head = parameter_groups(model, lr=1e-3, head_lr=0.1)
    assert (rest["lr"], head["lr"]) == (1e-3, 0.1)
    assert [tuple(p.shape)[0] for p in head["params"]] == [2, 2]  # the Linear head's weight and bias
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(rest["params"]) + len(head["params"]) == len(trainable) and rest["params"] and head["params"]


def test_without_head_lr_one_group():
    model = BertForSequenceClassification(BertConfig(**CONFIG))
    (group,) = parameter_groups(model, lr=1e-3)
    assert group["lr"] == 1e-3 and len(group["params"]) == len(list(model.parameters()))
