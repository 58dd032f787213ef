"""benchmarks/private_probe.py: the baseline's privacy parameter is the one asked for, and a bad one stops it early."""

import sys

import pytest
import torch


@pytest.fixture
def probe(benchmark_script):
    return benchmark_script("private_probe")


def test_the_probe_calibrates_its_noise_at_the_delta_asked_and_learns(probe, monkeypatch):
    asked = []
    real = probe.noise_multiplier_for
    monkeypatch.setattr(probe, "noise_multiplier_for", lambda **kw: asked.append(kw["delta"]) or real(**kw))
    torch.manual_seed(0)
    features = torch.randn(400, 8)
    labels = (features[:, 0] > 0).long()
    settings = dict(epsilon=8.0, batch_size=100, epochs=10, lr=0.05, max_grad_norm=1.0, init="zero", clip_fn="abadi")
    accuracy = probe.run_probe(features, labels, features, labels, delta="1/N", **settings)
    probe.run_probe(features, labels, features, labels, **settings)  # the library's default rule
    assert asked == [pytest.approx(1 / 400), pytest.approx(1 / 4000)]
    assert accuracy > 0.8  # one separable feature: a private logistic regression finds it


@pytest.mark.parametrize("delta", ["2", "1/M", "abc"])
def test_a_bad_delta_is_named_before_the_backbone_runs(probe, monkeypatch, capsys, delta):
    monkeypatch.setattr(probe, "embed", lambda *a: pytest.fail("the backbone ran before --delta was checked"))
    monkeypatch.setattr(sys, "argv", ["private_probe.py", "--delta", delta])
    with pytest.raises(SystemExit) as stop:
        probe.main()
    assert stop.value.code == 2 and "--delta" in capsys.readouterr().err
