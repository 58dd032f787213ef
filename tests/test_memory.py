"""Peak-memory simulation: the meta-device count against the same step on real CPU tensors, the breakdown
against parameter counts, the CUDA emulation (autocast casts, fused attention), the CLI's JSON and errors."""

import argparse
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config

from dpmemarc_core.cli.memory import add_memory_parser
from dpmemarc_core.memory.emulation import FusedAttention, MetaAutocast, meta_autocast_queries
from dpmemarc_core.memory.step import MemorySpec, step_memory
from dpmemarc_core.memory.tracker import StorageTracker
from dpmemarc_core.methods import apply
from dpmemarc_core.models import build_from_config


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny-gpt2") / "config.json"
    GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=500, n_positions=64, bos_token_id=0,
               eos_token_id=0).to_json_file(str(path))
    return str(path)


def spec(model: str, **kw) -> MemorySpec:
    # Eager attention: meta and CPU then run the same kernels (CPU SDPA has fused kernels meta lacks).
    return MemorySpec(model=model, **{"batch_size": 4, "seq_len": 32, "precision": "fp32",
                                      "attn_implementation": "eager", **kw})


@pytest.mark.parametrize("method, engine", [("full", "bk"), ("lora", "nondp")])
def test_meta_peak_matches_the_same_step_on_real_cpu_tensors(tiny_gpt2, method, engine):
    simulated = step_memory(spec(tiny_gpt2, method=method, engine=engine, device="meta"))
    real = step_memory(spec(tiny_gpt2, method=method, engine=engine, device="cpu"))
    assert simulated["simulated"] and not real["simulated"]
    # Real CPU also holds Adam's step counters (CPU scalars, not meta ones) and the CPU batch: a few bytes.
    assert simulated["peak_bytes"] == pytest.approx(real["peak_bytes"], rel=0.05)
    for role, nbytes in real["breakdown"].items():
        assert simulated["breakdown"][role] == pytest.approx(nbytes, rel=0.05, abs=4096), role


def test_breakdown_of_persistent_state_matches_parameter_counts(tiny_gpt2):
    result = step_memory(spec(tiny_gpt2, method="lora", engine="bk", device="meta"))
    model = apply(build_from_config(GPT2Config.from_json_file(tiny_gpt2), "generation"), "lora")
    trainable = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    frozen += sum(b.numel() * b.element_size() for b in model.buffers())
    b = result["breakdown"]
    assert result["trainable_parameters"] * 4 == trainable == b["trainable_params_bytes"]
    assert b["weights_bytes"] == frozen
    assert b["optimizer_state_bytes"] == 2 * trainable  # Adam's two moments (its step counters live on CPU)
    assert result["peak_bytes"] == sum(b.values())
    assert result["peak_bytes"] > frozen + 3 * trainable  # activations on top of the persistent state


def test_two_backward_passes_keep_no_per_layer_buffers(tiny_gpt2):
    # Ghost clipping in one pass keeps every layer's a and g until the norms are known; two passes reduce
    # each layer to per-example squared norms at once (and the recommendation of the method is overridable).
    one = step_memory(spec(tiny_gpt2, method="lora", engine="bk", device="meta", clipping_mode="ghost"))
    two = step_memory(spec(tiny_gpt2, method="lora", engine="bk", device="meta", clipping_mode="ghost",
                           backward_passes=2))
    assert (one["backward_passes"], two["backward_passes"]) == (1, 2)
    assert two["breakdown"]["engine_buffers_bytes"] < one["breakdown"]["engine_buffers_bytes"]
    with pytest.raises(ValueError, match="backward_passes"):
        MemorySpec(model=tiny_gpt2, method="lora", backward_passes=3)
    with pytest.raises(ValueError, match="backward_passes must be one of 1, 2, 'auto'"):
        MemorySpec(model=tiny_gpt2, method="lora", backward_passes=True)
    with pytest.raises(ValueError, match="backward_passes"):
        MemorySpec(model=tiny_gpt2, method="lora", engine="opacus", backward_passes=2)


def test_bf16_keeps_frozen_weights_low_and_trainable_fp32(tiny_gpt2):
    fp32 = step_memory(spec(tiny_gpt2, method="lora", engine="bk", device="meta"))
    bf16 = step_memory(spec(tiny_gpt2, method="lora", engine="bk", device="meta", precision="bf16"))
    amp = step_memory(spec(tiny_gpt2, method="lora", engine="bk", device="meta", precision="amp-bf16"))
    weights = [r["breakdown"]["weights_bytes"] for r in (bf16, fp32, amp)]
    assert weights[0] * 2 == weights[1] == weights[2]
    assert bf16["breakdown"]["trainable_params_bytes"] == fp32["breakdown"]["trainable_params_bytes"]
    assert bf16["peak_bytes"] < fp32["peak_bytes"]
    assert bf16["peak_bytes"] < amp["peak_bytes"]  # autocast keeps bf16 casts of the fp32 weights too


def test_meta_autocast_casts_like_cuda_autocast():
    with torch.device("meta"):
        x = torch.randn(4, 8, dtype=torch.bfloat16)
        weight = torch.nn.Parameter(torch.randn(16, 8))
    with MetaAutocast(torch.bfloat16) as autocast:
        out = F.linear(x, weight)
        assert out.dtype == torch.bfloat16
        assert F.layer_norm(out, (16,)).dtype == torch.float32
        assert torch.pow(out, 3.0).dtype == torch.float32
        cached = autocast._cache[id(weight)]
        F.linear(x, weight)
        assert autocast._cache[id(weight)] is cached  # one bf16 copy of a trainable weight per region
    assert not autocast._cache


def test_autocast_queries_on_meta_follow_the_innermost_region():
    # Recomputing code (checkpointing, reversible layers) saves torch's autocast state in forward and
    # re-enters it in backward; on meta those calls must reach the emulation.
    with torch.device("meta"):
        x = torch.randn(4, 8, dtype=torch.bfloat16)
        weight = torch.randn(16, 8)
    with meta_autocast_queries():
        assert torch.amp.is_autocast_available("meta") and not torch.is_autocast_enabled("meta")
        with torch.autocast("meta", dtype=torch.bfloat16):
            assert torch.is_autocast_enabled("meta") and torch.get_autocast_dtype("meta") == torch.bfloat16
            with torch.autocast("meta", enabled=False):
                assert not torch.is_autocast_enabled("meta")
                assert F.linear(x.float(), weight).dtype == torch.float32
            with torch.autocast("meta", dtype=torch.float16):
                assert F.linear(x, weight).dtype == torch.float16
            assert F.linear(x, weight).dtype == torch.bfloat16
    assert not torch.amp.is_autocast_available("meta")  # torch's own answers are back


def test_fused_attention_never_builds_the_score_matrix():
    b, h, t, d = 2, 4, 256, 16
    peaks = []
    for fused in (False, True):
        tracker = StorageTracker("meta")
        with torch.device("meta"):
            q = torch.randn(b, h, t, d, dtype=torch.bfloat16, requires_grad=True)
        with tracker:
            if fused:
                with FusedAttention():
                    out = F.scaled_dot_product_attention(q, q, q, is_causal=True)
            else:
                out = F.scaled_dot_product_attention(q, q, q, is_causal=True)
            out.sum().backward()
        peaks.append(tracker.report().peak_bytes)
        assert out.shape == q.shape
    scores = b * h * t * t * 2
    assert peaks[0] - peaks[1] >= scores


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dpmemarc")
    add_memory_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["memory", *argv])
    return args.func(args)


def test_cli_json_has_the_peak_and_its_breakdown(tiny_gpt2, capsys):
    assert run_cli(["--model", tiny_gpt2, "--method", "lora", "--batch-size", "2", "--seq-len", "8",
                    "--device", "meta", "--engine", "opacus", "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    for key in ("peak_bytes", "breakdown", "model", "method", "batch_size", "seq_len", "precision", "device",
                "engine", "simulated"):
        assert key in result
    assert result["simulated"] is True and result["device"] == "meta" and result["engine"] == "opacus"
    assert result["peak_bytes"] > 0 and result["batch_size"] == 2
    assert "5-15 % low" in captured.err


def test_bad_input_names_the_field(tiny_gpt2, capsys):
    with pytest.raises(ValueError, match="unknown config 'gpt-9'"):
        step_memory(MemorySpec(model="gpt-9", method="lora", device="meta"))
    with pytest.raises(ValueError, match="unknown method 'prefix'"):
        step_memory(spec(tiny_gpt2, method="prefix", device="meta"))
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        MemorySpec(model=tiny_gpt2, method="lora", batch_size=0)
    with pytest.raises(ValueError, match="engine must be one of"):
        MemorySpec(model=tiny_gpt2, method="lora", engine="fastdp")
    with pytest.raises(SystemExit):
        run_cli(["--model", tiny_gpt2, "--method", "lora", "--batch-size", "0"])
    assert "--batch-size must be an integer >= 1" in capsys.readouterr().err
