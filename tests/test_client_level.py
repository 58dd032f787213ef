"""The client-level accountant of a federated run: Gaussian mechanism per aggregated round, budget, resume."""

import math

import pytest
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from dpmemarc_core.federated.client_level import ClientLevelBudget


def test_each_round_is_one_gaussian_release_at_sample_rate_one():
    budget = ClientLevelBudget(noise_multiplier=2.0, delta=1e-5)
    for _ in range(3):
        budget.record_round()
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    expected, _ = get_privacy_spent(orders=orders, rdp=compute_rdp(q=1.0, noise_multiplier=2.0, steps=3,
                                                                   orders=orders), delta=1e-5)
    assert budget.epsilon == pytest.approx(expected, rel=1e-6)
    assert budget.record()["rounds"] == 3


def test_budget_refuses_the_round_that_would_pass_it():
    between = (ClientLevelBudget(1.0, 1e-5, rounds=1).epsilon + ClientLevelBudget(1.0, 1e-5, rounds=2).epsilon) / 2
    budget = ClientLevelBudget(noise_multiplier=1.0, delta=1e-5, target_epsilon=between)
    assert budget.allows_another_round()
    budget.record_round()
    assert not budget.allows_another_round()
    assert math.isinf(ClientLevelBudget(noise_multiplier=1.0, delta=1e-5).target_epsilon)


def test_resume_from_the_recorded_rounds():
    budget = ClientLevelBudget(noise_multiplier=1.5, delta=1e-4)
    budget.record_round()
    budget.record_round()
    assert ClientLevelBudget(noise_multiplier=1.5, delta=1e-4, rounds=2).epsilon == budget.epsilon


@pytest.mark.parametrize("kwargs, field", [({"delta": 0.0}, "client-dp-delta"), ({"delta": 1.0}, "client-dp-delta"),
                                           ({"delta": 1e-5, "target_epsilon": 0.0}, "client-dp-target-epsilon")])
def test_bad_settings_name_the_run_config_key(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ClientLevelBudget(noise_multiplier=1.0, **kwargs)
