"""The accountant against Google's independent dp_accounting package.

RDP: Opacus evaluates the orders RDPAccountant.DEFAULT_ALPHAS (1.1..10.9 by 0.1,
12..63); dp_accounting's default orders add 11 and 128..1024. We give
dp_accounting Opacus's orders for a like-for-like check, and also compare with
its defaults (the extra orders only matter for very small ε, outside this grid).
At fractional orders dp_accounting uses a bound that sits above the exact RDP of
the subsampled Gaussian (e.g. σ=0.7, q=0.02, α=1.5: 2.05e-3 vs 1.796e-3 from
numerical integration, which Opacus matches to 1e-9), so its ε is at or slightly
above Opacus's: we require ours <= reference and agreement to 1e-3 relative.
PRV (Opacus, Gopi et al.) is compared with dp_accounting's PLD accountant.
"""

import json
import math

import dp_accounting
import pytest
from dp_accounting import pld, rdp
from opacus.accountants import RDPAccountant

from dpmemarc_core.privacy.accountant import PrivacyAccountant, epsilon, noise_multiplier_for

# (σ, q, steps, δ): paper-like settings (q = 32/50k, 32/42k) and coarser ones.
RDP_GRID = [
    (1.0, 0.01, 1000, 1e-5),
    (0.8, 32 / 42061, 4000, 1 / 42061),
    (0.6, 32 / 50000, 2000, 2e-5),
    (2.0, 0.1, 100, 1e-6),
    (5.0, 1.0, 10, 1e-5),
    (1.5, 0.05, 300, 1e-3),
]
PRV_GRID = [(1.0, 0.01, 500, 1e-5), (2.0, 0.1, 50, 1e-6)]


def _event(sigma, q):
    return dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))


def _rdp_reference(history, delta, orders=None):
    accountant = rdp.RdpAccountant(orders=orders)
    for sigma, q, steps in history:
        accountant.compose(_event(sigma, q), steps)
    return accountant.get_epsilon(delta)


def _pld_reference(history, delta):
    accountant = pld.PLDAccountant()
    for sigma, q, steps in history:
        accountant.compose(_event(sigma, q), steps)
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("sigma,q,steps,delta", RDP_GRID)
def test_rdp_matches_dp_accounting(sigma, q, steps, delta):
    ours = epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta, accountant="rdp")
    same_orders = _rdp_reference([(sigma, q, steps)], delta, orders=RDPAccountant.DEFAULT_ALPHAS)
    default_orders = _rdp_reference([(sigma, q, steps)], delta)
    assert ours <= same_orders * (1 + 1e-12)
    assert ours == pytest.approx(same_orders, rel=1e-3)
    assert ours == pytest.approx(default_orders, rel=1e-2)


@pytest.mark.parametrize("sigma,q,steps,delta", PRV_GRID)
def test_prv_matches_pld(sigma, q, steps, delta):
    ours = epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta, accountant="prv")
    assert ours == pytest.approx(_pld_reference([(sigma, q, steps)], delta), rel=0.03)


def test_heterogeneous_history_matches_references():
    history = [(1.0, 0.01, 300), (0.7, 0.02, 100), (1.0, 0.01, 200)]
    delta = 1e-5
    for kind, reference in [
        ("rdp", _rdp_reference(history, delta, orders=RDPAccountant.DEFAULT_ALPHAS)),
        ("prv", _pld_reference(history, delta)),
    ]:
        accountant = PrivacyAccountant(kind)
        for sigma, q, steps in history:
            accountant.step(sigma, q, num_steps=steps)
        assert accountant.steps == 600
        assert accountant.get_epsilon(delta) == pytest.approx(reference, rel=1e-3 if kind == "rdp" else 0.03)


@pytest.mark.parametrize(
    "target,q,steps,delta,kind",
    [(8.0, 32 / 42061, 4000, 1 / 42061, "rdp"), (1.6, 0.01, 1000, 1e-5, "rdp"), (3.0, 0.05, 100, 1e-5, "prv")],
)
def test_noise_multiplier_for_inverts_epsilon(target, q, steps, delta, kind):
    sigma = noise_multiplier_for(target_epsilon=target, delta=delta, sample_rate=q, steps=steps, accountant=kind)
    spent = epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta, accountant=kind)
    assert target - 0.011 <= spent <= target


@pytest.mark.parametrize("kind", ["rdp", "prv"])
def test_unreachable_target_raises(kind):
    with pytest.raises(ValueError, match="target_epsilon=1e-06 is unreachable"):
        noise_multiplier_for(target_epsilon=1e-6, delta=1e-5, sample_rate=0.01, steps=10, accountant=kind)


@pytest.mark.parametrize("kind", ["rdp", "prv"])
def test_edge_cases(kind):
    assert epsilon(noise_multiplier=1.0, sample_rate=0.01, steps=0, delta=1e-5, accountant=kind) == 0.0
    assert epsilon(noise_multiplier=0.0, sample_rate=0.01, steps=5, delta=1e-5, accountant=kind) == math.inf
    assert noise_multiplier_for(target_epsilon=math.inf, delta=1e-5, sample_rate=0.01, steps=5, accountant=kind) == 0
    assert noise_multiplier_for(target_epsilon=1.0, delta=1e-5, sample_rate=0.01, steps=0, accountant=kind) == 0


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(noise_multiplier=-1.0), "noise_multiplier"),
        (dict(sample_rate=0.0), "sample_rate"),
        (dict(sample_rate=1.5), "sample_rate"),
        (dict(steps=-1), "steps"),
        (dict(steps=2.5), "steps"),
        (dict(delta=0.0), "delta"),
        (dict(delta=float("nan")), "delta"),
        (dict(accountant="gdp"), "accountant"),
    ],
)
def test_epsilon_rejects_bad_input(kwargs, field):
    args = dict(noise_multiplier=1.0, sample_rate=0.01, steps=10, delta=1e-5, accountant="rdp") | kwargs
    with pytest.raises(ValueError, match=field):
        epsilon(**args)


def test_rounds_compose_like_one_history():
    rounds, steps_per_round, sigma, q, delta = 5, 40, 0.9, 0.02, 1e-5
    by_rounds, by_step = PrivacyAccountant("rdp"), PrivacyAccountant("rdp")
    for _ in range(rounds):
        by_rounds.step(sigma, q, num_steps=steps_per_round)
        for _ in range(steps_per_round):
            by_step.step(sigma, q)
    one_history = epsilon(noise_multiplier=sigma, sample_rate=q, steps=rounds * steps_per_round, delta=delta)
    assert by_rounds.state_dict() == by_step.state_dict() == {"kind": "rdp", "history": [[sigma, q, 200]]}
    assert by_rounds.steps == 200
    assert by_rounds.get_epsilon(delta) == by_step.get_epsilon(delta) == one_history


@pytest.mark.parametrize("kind", ["rdp", "prv"])
def test_state_survives_json_round_trip(kind):
    accountant = PrivacyAccountant(kind)
    accountant.step(1.1, 0.013, num_steps=70)
    accountant.step(0.9, 1 / 3, num_steps=3)
    restored = PrivacyAccountant.from_state_dict(json.loads(json.dumps(accountant.state_dict())))
    assert restored.state_dict() == accountant.state_dict()
    assert restored.steps == accountant.steps == 73
    assert restored.get_epsilon(1e-5) == accountant.get_epsilon(1e-5)

    into_existing = PrivacyAccountant(kind)
    into_existing.step(3.0, 0.5)
    into_existing.load_state_dict(json.loads(json.dumps(accountant.state_dict())))
    assert into_existing.state_dict() == accountant.state_dict()


def test_load_state_dict_rejects_bad_state():
    accountant = PrivacyAccountant("rdp")
    with pytest.raises(ValueError, match="kind 'prv'"):
        accountant.load_state_dict({"kind": "prv", "history": []})
    with pytest.raises(ValueError, match=r"history\[0\].sample_rate"):
        accountant.load_state_dict({"kind": "rdp", "history": [[1.0, 2.0, 3]]})
    with pytest.raises(ValueError, match=r"history\[0\]"):
        accountant.load_state_dict({"kind": "rdp", "history": [[1.0, 0.1]]})
    with pytest.raises(ValueError, match="keys 'kind' and 'history'"):
        PrivacyAccountant.from_state_dict({"history": []})


def test_epsilon_if_predicts_without_mutating():
    accountant = PrivacyAccountant("rdp")
    accountant.step(1.0, 0.01, num_steps=100)
    before = accountant.state_dict()
    spent_now = accountant.get_epsilon(1e-5)

    predicted = accountant.epsilon_if(0.8, 0.02, 50, 1e-5)

    assert accountant.state_dict() == before
    assert accountant.get_epsilon(1e-5) == spent_now
    assert predicted > spent_now
    accountant.step(0.8, 0.02, num_steps=50)
    assert accountant.get_epsilon(1e-5) == predicted
