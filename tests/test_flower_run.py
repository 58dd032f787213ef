"""The simulated federation as a user starts it: deploy/run_local.sh (`flwr run .` with 3 simulated sites,
then the run's status from `flwr list`), on tiny settings. The script starts and stops its own SuperLink."""

from __future__ import annotations

import os
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from dpmemarc_core.offline import minilm_path
from server.checkpoint import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_flwr_run_simulates_three_sites_and_reports_completion(tmp_path):
    model = tmp_path / "tiny-bert"
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=64,
                                             max_position_embeddings=64)).save_pretrained(model)
    tokenizer.save_pretrained(model)
    port = free_port()
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr"), "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port)}
    output = tmp_path / "run"
    overrides = (f"model='{model}' task='synthetic' num-server-rounds=1 local-steps=1 batch-size=8 max-train=48 "
                 f"max-eval=16 max-length=16 method-options='{{\"r\": 2}}' output-dir='{output}'")

    run = subprocess.run(["deploy/run_local.sh", "--run-config", overrides], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)

    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "completed" in run.stdout
    record = read_metrics(output)[-1]
    assert record["round"] == 1 and record["accepted"] == 3 and len(record["epsilon"]) == 3  # keyed by node id
    assert all(0 < eps <= 8.0 for eps in record["epsilon"].values())
    assert (output / "round-1.safetensors").is_file() and (output / "run-lineage").is_file()
    with pytest.raises(OSError):  # the script stopped the SuperLink it started
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
