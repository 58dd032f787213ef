"""The reversible network's F variants (`f_module`): trainable parts, start point, replay, BK, memory, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from bk_reference import assert_bk_matches_reference
from peft.tuners.lora import LoraLayer
from test_reversible import assert_same_gradients, batch_for, build, gradients, loss_fn, reversible, stack_of
from torch import nn
from transformers import GPT2Config

from dpmemarc_core.memory.step import MemorySpec, step_memory
from dpmemarc_core.methods.registry import apply
from dpmemarc_core.methods.rev.stack import apply_rev

VARIANTS = ("parallel_adapter", "prefix", "dylora")
FAMILIES = ("gpt2", "roberta", "llama")
F_PART = {"parallel_adapter": ".f_adapter.", "prefix": ".f_prefix.", "dylora": ".lora_"}  # in trainable names
SEED = 6  # with r=4 and two blocks, DyLoRA draws ranks (3, 2) from this seed: the mask bites in both


def logits(model: nn.Module, family: str) -> torch.Tensor:
    batch = batch_for(family)
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def drawn_ranks(seed: int, blocks: int, r: int = 4) -> list[int]:
    """DyLoRA's ranks for one forward, drawn independently: one U{1..r} per block from the global generator."""
    torch.manual_seed(seed)
    return [int(torch.randint(1, r + 1, ())) for _ in range(blocks)]


# ---- the method's surface ------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("f_module", VARIANTS)
def test_only_the_chosen_f_module_adapters_and_head_train(family, f_module):
    original = build(family)
    backbone = sum(p.numel() for n, p in original.named_parameters() if not n.startswith("classifier."))
    model = apply_rev(original, r=4, f_module=f_module)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for block in range(2):
        assert any(f".blocks.{block}." in n and F_PART[f_module] in n for n in names), (block, names)
        assert any(f".blocks.{block}." in n and ".adapter." in n for n in names)
    assert all(F_PART[f_module] in n or ".adapter." in n or n.startswith("classifier.") for n in names), names
    # The pretrained backbone is entirely frozen, and nothing else is.
    assert sum(p.numel() for p in model.parameters() if not p.requires_grad) == backbone


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("f_module", VARIANTS)
def test_starts_where_lora_starts_and_the_module_is_in_the_forward(family, f_module):
    lora, model = apply_rev(build(family), r=4), apply_rev(build(family), r=4, f_module=f_module)
    torch.testing.assert_close(logits(model, family), logits(lora, family), rtol=1e-12, atol=1e-12)
    moved = reversible(family, f_module=f_module, segment_size=1)
    assert (logits(moved, family) - logits(lora, family)).abs().max() > 1e-3  # the test can fail


def test_parallel_modules_are_sized_by_r_and_zero_at_the_start():
    adapter = apply_rev(build("gpt2"), r=3, f_module="parallel_adapter").transformer.h[0].blocks[1].f_adapter
    prefix = apply_rev(build("gpt2"), r=3, f_module="prefix").transformer.h[0].blocks[1].f_prefix
    assert adapter.down.weight.shape == (3, 16) and adapter.up.weight.shape == (16, 3)
    assert prefix.key.weight.shape == (3, 16) and prefix.value.weight.shape == (16, 3) and prefix.key.bias is None
    assert adapter.up.weight.abs().max() == adapter.up.bias.abs().max() == prefix.value.weight.abs().max() == 0


def test_parallel_adapter_adds_only_its_term_and_prefix_attends_over_r_vectors():
    model = reversible("gpt2", f_module="parallel_adapter")
    adapter = stack_of(model).blocks[0].f_adapter
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    torch.testing.assert_close(adapter(x), adapter.up(nn.functional.gelu(adapter.down(x))), rtol=0, atol=0)
    prefix = stack_of(reversible("gpt2", f_module="prefix")).blocks[0].f_prefix
    keys, values = prefix.key.weight, prefix.value.weight.T  # [P, d] each
    want = torch.softmax(x @ keys.T / 4.0, dim=-1) @ values  # sqrt(d) = 4
    torch.testing.assert_close(prefix(x), want, rtol=1e-12, atol=1e-12)


# ---- DyLoRA's sampled rank ----------------------------------------------------------------------

def test_dylora_training_forward_uses_the_drawn_rank_at_scale_alpha_over_b():
    model = reversible("gpt2", f_module="dylora").train()
    ranks = drawn_ranks(SEED, 2)
    assert ranks == [3, 2]
    # Reference: the eval (full-rank) forward of a copy cut to rank b, B rescaled from α/r to α/b.
    cut = copy.deepcopy(model).eval()
    for block, b in zip(stack_of(cut).blocks, ranks):
        for layer in (m for m in block.modules() if isinstance(m, LoraLayer)):
            with torch.no_grad():
                layer.lora_A["default"].weight[b:] = 0
                layer.lora_B["default"].weight.mul_(4 / b)
    torch.manual_seed(SEED)
    torch.testing.assert_close(logits(model, "gpt2"), logits(cut, "gpt2"), rtol=1e-12, atol=1e-12)
    model.eval()
    assert (logits(model, "gpt2") - logits(cut, "gpt2")).abs().max() > 1e-3  # eval: all r components


@pytest.mark.parametrize("family", FAMILIES)
def test_dylora_reversible_backward_replays_the_drawn_rank(family):
    model = reversible(family, f_module="dylora").train()
    got, want = gradients(model, family, True, seed=SEED), gradients(model, family, False, seed=SEED)
    assert_same_gradients(got, want)
    # The cut components got no gradient (block 0 drew b=3: row 3 of its A), the kept ones did.
    a = next(g for n, g in want.items() if ".blocks.0." in n and "lora_A" in n)
    assert a[3:].abs().max() == 0 and a[:3].abs().amax(dim=1).min() > 0
    other = gradients(model, family, False, seed=SEED + 1)  # another draw, another gradient: the test can fail
    assert any((other[n] - want[n]).abs().max() > 1e-6 for n in want)


# ---- replayed backward and BK clipping -----------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("f_module", ["parallel_adapter", "prefix"])
def test_reversible_gradients_equal_plain_autograd(family, f_module):
    model = reversible(family, f_module=f_module)
    assert_same_gradients(gradients(model, family, True), gradients(model, family, False))


def seeded_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    # The reference runs one forward per example: the same seed gives each the same DyLoRA ranks.
    torch.manual_seed(SEED)
    return loss_fn(model, batch)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("f_module", VARIANTS)
@pytest.mark.parametrize("backward_passes", [1, 2])
def test_bk_matches_per_example_reference(family, f_module, backward_passes):
    model = reversible(family, f_module=f_module).train()
    # Llama, two passes: plain autograd of Σ c_i L_i over the batch already differs from Σ c_i ∇L_i by
    # ~1e-12 absolute (measured without any engine, with and without the reversible backward; the SDPA
    # attention backward, not this code). A clipped sum that cancels (DyLoRA's v_proj A) reaches 1.4e-6.
    rtol = 1e-5 if family == "llama" and backward_passes == 2 else 1e-6
    engine = assert_bk_matches_reference(model, batch_for(family), seeded_loss, rtol=rtol, max_grad_norm=1e-3,
                                         backward_passes=backward_passes, clipping_mode="mixed")
    layers = sum(1 for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.weight.requires_grad
                 and not n.startswith("classifier"))
    assert engine.tap_backward_calls >= layers


# ---- devices, memory, options ------------------------------------------------------------------------

@pytest.mark.parametrize("f_module", VARIANTS)
def test_new_modules_are_fp32_on_the_backbone_device(f_module):
    with torch.device("meta"):
        model = apply_rev(build("llama").to(torch.bfloat16), r=4, f_module=f_module)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad and F_PART[f_module] in n]
    assert trainable and all(p.dtype == torch.float32 and p.device.type == "meta" for _, p in trainable)


@pytest.mark.parametrize("f_module", VARIANTS)
def test_meta_memory_simulation_takes_the_option(tmp_path, f_module):
    path = tmp_path / "config.json"
    GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=500, n_positions=64, bos_token_id=0,
               eos_token_id=0).to_json_file(str(path))
    options = {"r": 64, "f_module": f_module}
    result = step_memory(MemorySpec(model=str(path), method="rev", batch_size=2, seq_len=16, precision="fp32",
                                    device="meta", method_options=options))
    assert result["simulated"] and result["peak_bytes"] > 0 and result["method_options"] == options
    assert result["backward_passes"] == "auto"


def test_registry_passes_f_module_through():
    model = apply(build("roberta"), "rev", r=64, f_module="prefix")
    assert stack_of(model).blocks[0].f_prefix.key.out_features == 64


def test_bad_f_module_names_the_field_and_the_choices():
    with pytest.raises(ValueError, match=r"f_module.*'lora', 'parallel_adapter', 'prefix', 'dylora'.*'adapter'"):
        apply_rev(build("gpt2"), f_module="adapter")
    with pytest.raises(ValueError, match="f_module"):
        apply(build("gpt2"), "rev", f_module=None)
    with pytest.raises(ValueError, match="lora_alpha"):
        apply_rev(build("gpt2"), f_module="prefix", lora_alpha=8)
