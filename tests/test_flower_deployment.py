"""A real deployment on loopback, through the deploy/ scripts: a SuperLink with TLS and SuperNode
authentication, two authenticated SuperNodes each training on its own JSONL file (different content, in
directories the other never sees), a ServerApp with no data at all, two rounds via `flwr run`, the exported
adapter loaded with peft, and a broken run reported as a failure. Every process started here is stopped by
its PID."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.numpy import load_file
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from dpmemarc_core.federated.wire import load_numpy_state
from dpmemarc_core.methods.pretrained import build_model, read_spec
from dpmemarc_core.models import load_backbone
from dpmemarc_core.offline import minilm_path
from server.checkpoint import read_metrics

ROOT = Path(__file__).resolve().parents[1]

TINY_RUN = ("task='classification' labels='negative,positive' num-server-rounds=2 local-steps=1 batch-size=8 "
            "max-length=16 method-options='{\"r\": 2}'")
SITE_ROWS = [  # each site's own notes: different content, labels by name at one site and by index at the other
    [{"text": f"the staff were {w}", "label": "positive"} for w in ("kind", "quick", "great", "calm")]
    + [{"text": f"the wait was {w}", "label": "negative"} for w in ("long", "awful", "cold", "rude")],
    [{"text": f"a {w} film", "label": 1} for w in ("fine", "lovely", "good", "fun")]
    + [{"text": f"a {w} plot", "label": 0} for w in ("dull", "poor", "bad", "slow")],
]


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
        for site, rows in enumerate(SITE_ROWS):
            subprocess.run(["flwr", "supernode", "register", str(credentials / f"supernode-{site}.pub"), "deploy"],
                           cwd=ROOT, env=env, check=True, capture_output=True)
            home = tmp_path / f"site-{site}"  # the site's own disk: its file and its privacy records
            home.mkdir()
            (home / "notes.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
            start(f"supernode-{site}", "deploy/start_site.sh", str(credentials / f"supernode-{site}"),
                  str(credentials / "ca.crt"), str(home / "notes.jsonl"), address, str(free_port()),
                  str(home / "state"))

        output = tmp_path / "run"
        run = subprocess.run(["deploy/flwr_run_checked.sh", "deploy", "--run-config",
                              f"{TINY_RUN} model='{tiny_model_dir}' output-dir='{output}'"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        record = read_metrics(output)[-1]
        assert record["round"] == 2 and record["accepted"] == 2 and len(record["epsilon"]) == 2
        assert record["eval"] == {}  # the server holds no data: no eval-path, no public data set
        assert {c["num-examples"] for c in record["clients"]} == {8}  # each site's N is its own file's size
        assert all((tmp_path / f"site-{i}" / "state").is_dir() for i in range(2))  # budgets on the sites' disks
        assert_peft_loads_the_final_adapter(output, tiny_model_dir)

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


def assert_peft_loads_the_final_adapter(output: Path, base_dir: str) -> None:
    """<output-dir>/final/ is a peft adapter: PeftModel.from_pretrained on the plain base gives the logits of
    dpmemarc's own model holding the last round's global state."""
    final = output / "final"
    assert {"adapter_config.json", "adapter_model.safetensors", "privacy.json"} <= {p.name for p in final.iterdir()}
    privacy = json.loads((final / "privacy.json").read_text())
    assert len(privacy["sites"]) == 2 and all(site["steps"] == 2 for site in privacy["sites"].values())
    base, tokenizer = load_backbone(base_dir, "classification", num_labels=2)
    peft_model = PeftModel.from_pretrained(base, str(final)).eval()
    ours = build_model(read_spec(final)).eval()
    load_numpy_state(ours, load_file(str(output / "round-2.safetensors")))
    batch = tokenizer(["the staff were kind", "a dull plot"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**batch).logits, ours(**batch).logits, rtol=0, atol=1e-5)
