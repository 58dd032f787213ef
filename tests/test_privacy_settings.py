"""Every bad privacy parameter is refused with a ValueError naming the field."""

import dataclasses
import math

import numpy as np
import pytest

from dpmemarc_core.privacy.settings import (
    PrivacySettings,
    check_count,
    check_delta,
    check_epsilon,
    check_max_grad_norm,
    check_noise_multiplier,
    check_sample_rate,
)

NAN, INF = float("nan"), math.inf


@pytest.mark.parametrize(
    "check,field,bad",
    [
        (check_epsilon, "epsilon", [0, -1.0, INF, -INF, NAN, "8", None, True]),
        (check_delta, "delta", [0, 1, 1.5, -1e-5, INF, NAN, "1e-5", None]),
        (check_sample_rate, "sample_rate", [0, -0.1, 1.0001, INF, NAN, None]),
        (check_noise_multiplier, "noise_multiplier", [-0.1, INF, NAN, "1", None]),
        (check_max_grad_norm, "max_grad_norm", [0, -1.0, INF, NAN, None]),
    ],
)
def test_checks_reject_bad_values(check, field, bad):
    for value in bad:
        with pytest.raises(ValueError, match=field):
            check(value)


def test_checks_name_the_field_given():
    with pytest.raises(ValueError, match="target_epsilon must satisfy 0 < value < inf"):
        check_epsilon(-1, name="target_epsilon")
    with pytest.raises(ValueError, match="server_delta must satisfy 0 < value < 1"):
        check_delta(2, name="server_delta")


def test_checks_accept_and_normalise_good_values():
    assert check_epsilon(8) == 8.0 and isinstance(check_epsilon(8), float)
    assert check_epsilon(INF, allow_inf=True) == INF
    assert check_delta(np.float64(1e-5)) == 1e-5
    assert check_sample_rate(1) == 1.0
    assert check_noise_multiplier(0) == 0.0
    assert check_max_grad_norm(0.1) == 0.1
    assert check_count(np.int64(3), "steps") == 3


def test_epsilon_nan_is_refused_even_when_inf_is_allowed():
    with pytest.raises(ValueError, match="epsilon"):
        check_epsilon(NAN, allow_inf=True)
    with pytest.raises(ValueError, match="epsilon"):
        check_epsilon(-INF, allow_inf=True)


@pytest.mark.parametrize("bad", [-1, 1.0, True, "2", None])
def test_count_rejects_non_integers_and_negatives(bad):
    with pytest.raises(ValueError, match="steps must be an integer >= 0"):
        check_count(bad, "steps")


def test_settings_defaults_and_non_private():
    settings = PrivacySettings()
    assert (settings.target_epsilon, settings.delta, settings.max_grad_norm) == (8.0, None, 1.0)
    assert (settings.clipping_mode, settings.clip_fn, settings.accountant) == ("mixed", "abadi", "rdp")
    assert settings.is_private
    assert not PrivacySettings(target_epsilon=INF).is_private
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.target_epsilon = 1.0


@pytest.mark.parametrize(
    "field,bad",
    [
        ("target_epsilon", 0.0),
        ("target_epsilon", -2.0),
        ("target_epsilon", NAN),
        ("delta", 0.0),
        ("delta", 1.0),
        ("delta", NAN),
        ("max_grad_norm", 0.0),
        ("max_grad_norm", INF),
        ("max_grad_norm", NAN),
        ("clipping_mode", "fast"),
        ("clip_fn", "psac"),
        ("accountant", "gdp"),
    ],
)
def test_settings_reject_bad_fields(field, bad):
    with pytest.raises(ValueError, match=field):
        PrivacySettings(**{field: bad})


def test_resolved_delta():
    assert PrivacySettings(delta=1e-6).resolved_delta(100) == 1e-6
    # The default is strictly below 1/N (δ ≪ 1/N); "1/N" is the paper's rule, kept by its preset.
    assert PrivacySettings().resolved_delta(42061) == 0.1 / 42061 < 1 / 42061
    assert PrivacySettings(delta="1/N").resolved_delta(42061) == 1 / 42061
    assert PrivacySettings().resolved_delta(1) == 0.1
    with pytest.raises(ValueError, match="delta must be one of"):
        PrivacySettings(delta="1/(2N)")
    with pytest.raises(ValueError, match="num_examples"):
        PrivacySettings(delta="1/N").resolved_delta(1)
    for bad in [0, -5, 2.5]:
        with pytest.raises(ValueError, match="num_examples"):
            PrivacySettings().resolved_delta(bad)
