"""benchmarks/ghost_rule.py: both forms timed per layer shape, and the pick is the library's mixed rule."""

import json

import pytest
import torch

from dpmemarc_core.privacy.layers import GhostRule


@pytest.fixture
def ghost_rule(benchmark_script):
    return benchmark_script("ghost_rule")


def test_both_forms_are_timed_and_compute_the_same_clipped_sum(ghost_rule, tmp_path):
    out = tmp_path / "g.json"
    ghost_rule.main(["--batch-size", "2", "--seq-len", "4", "--repeats", "1", "--rounds", "1", "--out", str(out)])
    layers = json.loads(out.read_text())["layers"]
    assert set(layers) == set(ghost_rule.SHAPES)
    for cell in layers.values():
        assert cell["ms"]["ghost"] > 0 and cell["ms"]["instantiated"] > 0
        a, g = torch.empty(2, 4, cell["rows"]), torch.empty(2, 4, cell["cols"])
        factored = GhostRule("mixed", set())(torch.empty(cell["rows"], cell["cols"]), a, g)
        assert cell["rule_picks"] == ("ghost" if factored else "instantiated")
    a, g = torch.randn(2, 4, 6, dtype=torch.float64), torch.randn(2, 4, 5, dtype=torch.float64)
    timed = ghost_rule.forms(a, g, torch.rand(2, dtype=torch.float64))
    torch.testing.assert_close(timed["ghost"](), timed["instantiated"]())
