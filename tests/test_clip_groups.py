"""Group-wise clipping (`BKEngine(clip_groups=...)`, `--clip-groups head`) against the float64 reference."""

from __future__ import annotations

import pytest
import torch
from bk_reference import bk_result, clipped_reference
from test_bk_engine import _prepared, _threshold, build, loss64, make_batch

from dpmemarc_core.methods import apply
from dpmemarc_core.privacy import BKEngine, PrivacySettings
from dpmemarc_core.training.bk import PrivateTrainer, clip_groups


def _groups(model: torch.nn.Module) -> tuple[list[list[str]], list[list[torch.Tensor]]]:
    """[the rest, the classifier head] by name and by tensor."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    head = [(n, p) for n, p in named if n.startswith("classifier.")]
    rest = [(n, p) for n, p in named if not n.startswith("classifier.")]
    return [[n for n, _ in rest], [n for n, _ in head]], [[p for _, p in rest], [p for _, p in head]]


@pytest.mark.parametrize("mode,clip_fn,passes", [("mixed", "abadi", 1), ("ghost", "automatic", 2),
                                                 ("instantiate", "abadi", 2), ("mixed", "abadi", "auto")])
def test_head_and_rest_match_the_reference(mode, clip_fn, passes):
    model = _prepared("bert", subset=False)
    batch = make_batch("bert")
    names, tensors = _groups(model)
    threshold = _threshold("bert", False)
    norms, grads, _ = bk_result(model, batch, loss64, max_grad_norm=threshold, clipping_mode=mode, clip_fn=clip_fn,
                                backward_passes=passes, clip_groups=tensors)
    ref_norms, ref_sums = clipped_reference(model, batch, loss64, threshold, clip_fn, groups=names)
    torch.testing.assert_close(norms.double(), ref_norms, rtol=1e-6, atol=0)
    for name, ref in ref_sums.items():
        torch.testing.assert_close(grads[name].double(), ref, rtol=1e-6, atol=1e-9 * ref.abs().max().item())
    # Group-wise differs from one norm on this batch (else the test could not tell them apart).
    _, flat = clipped_reference(model, batch, loss64, threshold, clip_fn)
    assert any(not torch.allclose(flat[n], ref_sums[n], rtol=1e-3) for n in names[1])


def test_each_example_clipped_gradient_stays_within_C():
    """The sensitivity the noise is calibrated to: ‖Σ_k c_k g_k‖ ≤ C for every single example."""
    model = _prepared("bert", subset=False)
    batch = make_batch("bert")
    _, tensors = _groups(model)
    threshold = 0.05 * _threshold("bert", False)  # every group of every example clipped
    for i in range(batch["input_ids"].shape[0]):
        one = {k: v[i:i + 1] for k, v in batch.items()}
        _, grads, engine = bk_result(model, one, loss64, max_grad_norm=threshold, clip_groups=tensors)
        total = torch.sqrt(sum(g.double().pow(2).sum() for g in grads.values()))
        assert total <= threshold * (1 + 1e-9) and total >= 0.99 * threshold  # both groups at C/√2: exactly C
        assert engine.last_clipped.tolist() == [True]


def test_groups_must_partition_the_trainable_parameters():
    model = build("bert")
    params = [p for p in model.parameters() if p.requires_grad]
    with pytest.raises(ValueError, match="partition"):
        BKEngine(model, clip_groups=[params[:3]])
    with pytest.raises(ValueError, match="groups 0 and 1"):
        BKEngine(model, clip_groups=[params, params[:1]])
    with pytest.raises(ValueError, match=r"clip_groups\[1\] is empty"):
        BKEngine(model, clip_groups=[params, []])


def test_trainer_groups_follow_the_setting():
    model = apply(build("bert"), "lora", r=1)
    assert clip_groups(model, "all") is None
    rest, head = clip_groups(model, "head")
    assert len(head) == 2 and rest and {id(p) for p in rest + head} == {
        id(p) for p in model.parameters() if p.requires_grad}
    with pytest.raises(ValueError, match="clip_groups='head' needs a trainable classifier head"):
        clip_groups(apply(build("gpt2"), "lora", r=1), "head")
    with pytest.raises(ValueError, match="clip_groups must be one of"):
        PrivacySettings(clip_groups="layer")



@pytest.mark.parametrize("choice,sizes", [("all", None), ("head", 2)])
def test_trainer_clips_by_the_settings_groups(choice, sizes):
    model = apply(build("bert").float(), "lora", r=1)
    data = [{"input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor(i % 2)} for i in range(8)]

    def collate(rows):
        return {"input_ids": torch.stack([r["input_ids"] for r in rows]),
                "labels": torch.stack([r["labels"] for r in rows])}

    trainer = PrivateTrainer(model, data, collate, PrivacySettings(clip_groups=choice, max_grad_norm=1e-6),
                             sample_rate=1.0, noise_multiplier=0.5, sampling_seed=0, noise_seed=0)
    head = {id(p) for p in model.classifier.parameters() if p.requires_grad}
    groups = trainer.engine._groups
    assert len(groups) == (1 if sizes is None else 2)
    if sizes:
        assert {id(p) for p in groups[1]} == head and not head & {id(p) for p in groups[0]}
    stats = trainer.run(1, progress=False)
    assert stats["clipped_fraction"] == 1.0  # C = 1e-6: every example is clipped, counted once whatever its groups
