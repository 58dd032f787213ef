"""`dpmemarc memory --method zo`: DPZero's step (two perturbed forwards, clipped scalars, noise, in-place
update) counted like the other steps. Its peak sits near an inference forward's and far below a BK step's,
it holds no gradient or optimizer byte, and the meta count equals the same step on real CPU tensors."""

import argparse

import pytest
from transformers import BertConfig, GPT2Config

from dpmemarc_core.cli.memory import add_memory_parser, run_memory
from dpmemarc_core.memory.step import MemorySpec, inference_memory, step_memory

# zo's peak over a bare inference forward's, measured on these tiny configs in bf16 (zo_params full / lora):
# GPT-2 1.94 / 2.03 (the per-example loss's fp32 temporaries over B·T·V logits, which a forward without a loss
# does not make; with a 500-word vocabulary and 280 kB of weights they dominate), BERT 1.003 / 1.16 (a 2-label
# head; LoRA's factors and their activations). A BK LoRA step is 3-7x inference.
INFERENCE_FACTOR = {"gpt2": 2.1, "bert": 1.2}


@pytest.fixture(scope="module")
def tiny_configs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=500, n_positions=128, bos_token_id=0,
               eos_token_id=0).to_json_file(str(root / "gpt2.json"))
    BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=256, vocab_size=500,
               max_position_embeddings=128).to_json_file(str(root / "bert.json"))
    return {"gpt2": str(root / "gpt2.json"), "bert": str(root / "bert.json")}


def spec(model: str, **kw) -> MemorySpec:
    return MemorySpec(model=model, **{"batch_size": 8, "seq_len": 64, "precision": "bf16", "device": "meta", **kw})


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_zo_peak_is_near_inference_and_below_bk_steps(tiny_configs, family):
    model = tiny_configs[family]
    inference = inference_memory(spec(model, method="full"))["peak_bytes"]
    lora = step_memory(spec(model, method="lora"))["peak_bytes"]
    full = step_memory(spec(model, method="full"))["peak_bytes"]
    for zo_params in ("full", "lora"):
        zo = step_memory(spec(model, method="zo", zo_params=zo_params))
        assert inference <= zo["peak_bytes"] <= INFERENCE_FACTOR[family] * inference
        assert zo["peak_bytes"] < lora / 2 and zo["peak_bytes"] < full / 2
        for role in ("grads", "optimizer_state", "optimizer_temporaries"):
            assert zo["breakdown"][f"{role}_bytes"] == 0
        assert zo["zo_params"] == zo_params and zo["backward_passes"] == 0


def test_zo_keeps_perturbed_weights_in_the_low_precision(tiny_configs):
    # No optimizer, so no fp32 master copy: the perturbed backbone costs 2 bytes a parameter under bf16
    # (a BK full step keeps 4).
    zo = step_memory(spec(tiny_configs["gpt2"], method="zo", zo_params="full"))
    assert zo["breakdown"]["trainable_params_bytes"] == 2 * zo["trainable_parameters"]
    bk = step_memory(spec(tiny_configs["gpt2"], method="full"))
    assert bk["breakdown"]["trainable_params_bytes"] == 4 * bk["trainable_parameters"]
    bitfit = step_memory(spec(tiny_configs["gpt2"], method="zo", zo_params="bitfit"))
    assert 0 < bitfit["trainable_parameters"] < zo["trainable_parameters"]


@pytest.mark.parametrize("engine", ["bk", "nondp"])
def test_zo_meta_count_matches_real_cpu_tensors(tiny_configs, engine):
    # fp32 and eager attention: meta and CPU then run the same kernels.
    kw = {"method": "zo", "engine": engine, "precision": "fp32", "attn_implementation": "eager",
          "batch_size": 4, "seq_len": 32}
    simulated = step_memory(spec(tiny_configs["gpt2"], **kw))
    real = step_memory(spec(tiny_configs["gpt2"], **kw, device="cpu"))
    assert simulated["peak_bytes"] == real["peak_bytes"]
    assert simulated["breakdown"] == real["breakdown"]


def test_zo_settings_are_checked(tiny_configs):
    model = tiny_configs["gpt2"]
    with pytest.raises(ValueError, match="zo_params must be one of full, lora, bitfit"):
        MemorySpec(model=model, method="zo", zo_params="adapter")
    with pytest.raises(ValueError, match="engine 'opacus' cannot run method 'zo'"):
        MemorySpec(model=model, method="zo", engine="opacus")
    with pytest.raises(ValueError, match="backward_passes must be None for method 'zo'"):
        MemorySpec(model=model, method="zo", backward_passes=1)
    with pytest.raises(ValueError, match="zo_params is a setting of method 'zo'"):
        MemorySpec(model=model, method="lora", zo_params="lora")


def test_cli_zo_params_and_backward_passes(tiny_configs, capsys):
    parser = argparse.ArgumentParser()
    add_memory_parser(parser.add_subparsers(dest="command"))
    base = ["memory", "--model", tiny_configs["gpt2"], "--batch-size", "2", "--seq-len", "16", "--device", "meta"]
    args = parser.parse_args([*base, "--method", "zo", "--zo-params", "bitfit"])
    assert run_memory(args) == 0
    assert "grads                     0.000" in capsys.readouterr().out
    args = parser.parse_args([*base, "--method", "lora", "--backward-passes", "2", "--clipping-mode", "ghost"])
    assert args.backward_passes == 2
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--method", "zo", "--zo-params", "adapter"])
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--method", "lora", "--backward-passes", "3"])


def test_simulation_cells_print_a_complete_command():
    # A cell's command, parsed by the CLI, gives back the cell's spec (zo_params and backward_passes included).
    import shlex

    from simulations.common import memory_command, memory_spec

    config = {"memory": {"model": "roberta-large"}, "zo_params": "bitfit"}
    parser = argparse.ArgumentParser()
    add_memory_parser(parser.add_subparsers(dest="command"))
    zo = memory_spec(config, "zo", 8.0)
    ghost = memory_spec(config, "side", 8.0, {"engine": "bk", "clipping_mode": "ghost", "backward_passes": 2})
    assert zo["zo_params"] == "bitfit" and "zo_params" not in ghost
    for cell in (zo, ghost):
        args = parser.parse_args(shlex.split(memory_command(cell))[1:-1])
        assert args.zo_params == cell.get("zo_params", "full")
        assert args.backward_passes == cell.get("backward_passes")
        assert (args.method, args.engine, args.clipping_mode) == (cell["method"], cell["engine"],
                                                                   cell.get("clipping_mode", "mixed"))
