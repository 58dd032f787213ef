"""A real deployment on loopback, through the deploy/ scripts: a SuperLink with TLS and SuperNode
authentication, two authenticated SuperNodes with their partitions, a tiny run via `flwr run`, and a
broken run reported as a failure. Every process started here is stopped by its PID."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from dpmemarc_core.offline import minilm_path
from server.checkpoint import read_metrics

ROOT = Path(__file__).resolve().parents[1]

TINY_RUN = ("task='synthetic' num-server-rounds=1 local-steps=1 batch-size=8 max-train=32 max-eval=16 "
            "max-length=16 method-options='{\"r\": 2}'")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tiny_model_dir(tmp_path) -> str:
    path = tmp_path / "tiny-bert"
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=64,
                                             max_position_embeddings=64)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_tls_deployment_with_node_authentication_runs_and_reports_failures(tiny_model_dir, tmp_path):
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr"), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    credentials, logs = tmp_path / "credentials", tmp_path / "logs"
    logs.mkdir()
    subprocess.run([sys.executable, "deploy/make_credentials.py", str(credentials), "--supernodes", "2"],
                   cwd=ROOT, env=env, check=True)
    port = free_port()
    address = f"127.0.0.1:{port}"
    processes: list[subprocess.Popen] = []

    def start(name: str, *command: str) -> None:
        with open(logs / f"{name}.log", "w") as log:
            processes.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))

    try:
        start("superlink", "deploy/start_superlink.sh", str(credentials), str(port))
        subprocess.run([sys.executable, "deploy/set_connection.py", "--wait", "deploy", address,
                        "--root-certificates", str(credentials / "ca.crt")], cwd=ROOT, env=env, check=True)
        with pytest.raises(OSError):  # plain HTTP is not served: TLS only
            urllib.request.urlopen(f"http://{address}/health", timeout=5)
        for site in range(2):
            subprocess.run(["flwr", "supernode", "register", str(credentials / f"supernode-{site}.pub"), "deploy"],
                           cwd=ROOT, env=env, check=True, capture_output=True)
            start(f"supernode-{site}", "deploy/start_supernode.sh", str(credentials), str(site), "2", address,
                  str(free_port()))

        output = tmp_path / "run"
        run = subprocess.run(["deploy/flwr_run_checked.sh", "deploy", "--run-config",
                              f"{TINY_RUN} model='{tiny_model_dir}' output-dir='{output}'"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        record = read_metrics(output)[-1]
        assert record["round"] == 1 and record["accepted"] == 2 and sorted(record["epsilon"]) == ["0", "1"]

        broken = subprocess.run(["deploy/flwr_run_checked.sh", "deploy", "--run-config",
                                 f"{TINY_RUN} model='{tmp_path / 'absent'}' output-dir='{tmp_path / 'broken'}'"],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert broken.returncode != 0
        assert "FAILED" in broken.stderr and "finished:failed" in broken.stderr
        assert "does not exist" in broken.stdout + broken.stderr
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
