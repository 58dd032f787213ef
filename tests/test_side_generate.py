"""`SideTunedModel.generate`: greedy decoding that respects left padding and EOS (side's BLEU cells need it)."""

import pytest
import torch

from tests.test_side import PAD, VOCAB, _side


def _prompt(length: int, seed: int) -> torch.Tensor:
    return torch.randint(2, VOCAB, (length,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_greedy_tokens_follow_the_forward_argmax(name):
    model = _side(name)
    ids = _prompt(5, 0)[None]
    out = model.generate(ids, max_new_tokens=4)
    assert out.shape == (1, 9) and torch.equal(out[:, :5], ids)
    for step in range(4):
        prefix = out[:, :5 + step]
        assert out[0, 5 + step] == model(input_ids=prefix).logits[0, -1].argmax()


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_a_left_padded_row_decodes_as_it_would_alone(name):
    model = _side(name)
    short, long = _prompt(3, 1), _prompt(6, 2)
    ids = torch.stack([torch.cat([torch.full((3,), PAD), short]), long])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1] * 6])
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=4)
    assert torch.equal(batch[0, 6:], model.generate(short[None], max_new_tokens=4)[0, 3:])
    assert torch.equal(batch[1, 6:], model.generate(long[None], max_new_tokens=4)[0, 6:])


def test_rows_stop_at_eos_and_finished_rows_are_padded():
    model = _side("gpt2")
    ids = torch.stack([_prompt(4, 3), _prompt(4, 4)])
    free = model.generate(ids, max_new_tokens=3)
    eos = int(free[0, 4])  # row 0's first token ends row 0 at once
    out = model.generate(ids, max_new_tokens=3, eos_token_id=eos, pad_token_id=PAD)
    assert out[0, 4] == eos and (out[0, 5:] == PAD).all()
    if eos not in free[1, 4:].tolist():
        assert torch.equal(out[1], free[1])  # the other row is unaffected


def test_bad_calls_are_clear_errors():
    with pytest.raises(ValueError, match="causal-LM"):
        _side("bert").generate(_prompt(4, 0)[None])
    model = _side("gpt2")
    with pytest.raises(ValueError, match="greedy"):
        model.generate(_prompt(4, 0)[None], do_sample=True)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(_prompt(4, 0)[None], max_new_tokens=0)
    with pytest.raises(ValueError, match="pad_token_id"):
        model.generate(_prompt(4, 0)[None], eos_token_id=0)
