"""Run-config keys `precision`, `memory` and `physical-batch-size = "auto"`: parsing, errors, a site's choice."""

from types import SimpleNamespace

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from dpmemarc_core.federated.config import FederatedConfig
from dpmemarc_core.federated.site import site_physical_batch_size
from dpmemarc_core.methods import apply


def test_run_config_takes_precision_memory_and_auto():
    cfg = FederatedConfig.from_run_config({"precision": "bf16", "physical-batch-size": "auto", "memory": "8GiB"})
    assert (cfg.precision, cfg.physical_batch_size, cfg.memory) == ("bf16", "auto", "8GiB")
    assert cfg.eval_batch_size() == 64
    assert FederatedConfig.from_run_config({"physical-batch-size": 16}).eval_batch_size() == 16
    for key, value, message in (("precision", "fp8", "precision must be one of"),
                                ("physical-batch-size", "big", "physical-batch-size must be an integer >= 0 or"),
                                ("physical-batch-size", -1, "physical-batch-size"),
                                ("memory", "lots", "memory must be a size"),
                                ("physical-batch-size", 1.5, "must be a int | str")):
        with pytest.raises(ValueError, match=message):
            FederatedConfig.from_run_config({key: value})


def test_a_site_fits_its_micro_batch_to_its_budget(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DPMEMARC_CACHE", str(tmp_path))
    torch.manual_seed(0)
    backbone = BertForSequenceClassification(BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                                        intermediate_size=64, vocab_size=100, num_labels=2))
    model = apply(backbone, "lora", r=1)
    fits = {}
    for memory in ("1GiB", "900KiB"):
        cfg = FederatedConfig(physical_batch_size="auto", memory=memory, batch_size=16, max_length=32)
        fits[memory] = site_physical_batch_size(cfg, model, "fp32", torch.device("cpu"))
    assert fits["1GiB"] == 16 and 1 <= fits["900KiB"] < 16
    assert "physical batch size auto" in capsys.readouterr().out
    # Without `memory`, a CPU site's budget is the RAM available (here made as small as 900 KiB).
    monkeypatch.setattr("psutil.virtual_memory", lambda: SimpleNamespace(available=900 * 1024))
    assert site_physical_batch_size(FederatedConfig(physical_batch_size="auto", batch_size=16, max_length=32), model,
                                    "fp32", torch.device("cpu")) == fits["900KiB"]
    with pytest.raises(ValueError, match="needs a memory budget on device 'meta'"):
        site_physical_batch_size(FederatedConfig(physical_batch_size="auto"), model, "fp32", torch.device("meta"))
    assert site_physical_batch_size(FederatedConfig(physical_batch_size=0), model, "fp32", torch.device("cpu")) is None
