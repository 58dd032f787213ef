"""BK clipping on every baseline method × model family equals the float64 per-example reference.

LoRA's B and the adapters' up-projections start at zero, which would make the other factor's gradient
zero too; the test moves every trainable tensor off its initial value first, through the state API.
"""

from __future__ import annotations

import pytest
import torch
from bk_reference import assert_bk_matches_reference
from test_bk_engine import build, freeze_key_biases, loss64, make_batch, median_norm

from dpmemarc_core.methods import apply, load_trainable_state_dict, trainable_state_dict

METHODS = {"full": {}, "lora": {"r": 4}, "adapter": {"bottleneck": 4}, "bitfit": {}}
# Default Llama has no biases (bitfit refuses it, see test_methods.py): bitfit runs on a biased Llama.
CASES = [(method, family) for method in METHODS for family in ("gpt2", "roberta", "bert", "llama")]
CASES = [(m, "llama_bias" if (m, f) == ("bitfit", "llama") else f) for m, f in CASES]


def _perturbed(method: str, family: str) -> torch.nn.Module:
    model = apply(build(family), method, **METHODS[method])
    freeze_key_biases(model)
    gen = torch.Generator().manual_seed(2)
    state = {name: t + 0.1 * torch.randn(t.shape, generator=gen, dtype=t.dtype)
             for name, t in trainable_state_dict(model).items()}
    load_trainable_state_dict(model, state)
    return model


@pytest.mark.parametrize("mode,passes", [("mixed", 1), ("ghost", 2)])
@pytest.mark.parametrize("method,family", CASES)
def test_bk_matches_reference_after_apply(method, family, mode, passes):
    model = _perturbed(method, family)
    batch = make_batch(family)
    assert_bk_matches_reference(model, batch, loss64, max_grad_norm=median_norm(model, batch),
                                clipping_mode=mode, backward_passes=passes)
