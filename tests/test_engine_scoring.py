"""Runner.token_logprobs (the engine's scoring entry point) against the model's own forward."""

from __future__ import annotations

import pytest
import torch

from fastxlstm.config import XLSTMConfig
from fastxlstm.engine.runner import Runner

from .helpers import perturbed_model

CFG = XLSTMConfig(vocab_size=259, embedding_dim=64, num_blocks=2, num_heads=2, weight_mode="fused", chunk_size=16)


@pytest.fixture(scope="module")
def ref():
    return perturbed_model(CFG)


def _want(ref, ids, state=None):
    with torch.no_grad():
        logits, new_state = ref(ids, state)
    return torch.log_softmax(logits.double(), -1), new_state


def _close_states(got, want):
    for layer, want_layer in zip(got, want):
        for t, w in zip(layer, want_layer):
            assert torch.allclose(t, w, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("chunk,head_rows", [(1, 1024), (7, 5), (16, 3), (4096, 1024)])
def test_logprobs_equal_model_forward(ref, chunk, head_rows):
    g = torch.Generator().manual_seed(chunk)
    ids = torch.randint(3, CFG.vocab_size, (3, 45), generator=g)
    targets = torch.randint(0, CFG.vocab_size, (3, 45), generator=g)
    runner = Runner(perturbed_model(CFG), chunk_size=chunk)
    out = runner.token_logprobs(ids, targets, top_k=4, head_rows=head_rows, last_logits=True)
    lp, want_state = _want(ref, ids)
    want = lp.gather(-1, targets[..., None])[..., 0]
    assert torch.equal(out.ranks, 1 + (lp > want[..., None]).sum(-1))  # (no ties in random float64 logits)
    with torch.no_grad():
        assert torch.allclose(out.last_logits, ref(ids)[0][:, -1], atol=2e-5, rtol=1e-5)
    assert torch.allclose(out.logprobs.double(), want, atol=2e-5, rtol=1e-5), (out.logprobs - want).abs().max()
    assert torch.equal(out.greedy, lp.argmax(-1) == targets)
    vals, idx = lp.topk(4, dim=-1)
    assert torch.allclose(out.top_logprobs.double(), vals, atol=2e-5)
    assert torch.equal(out.top_ids, idx)
    _close_states(out.state, want_state)


def test_padding_rows_score_alone_and_state_continues(ref):
    """Right-padded rows of different lengths give each row's own scores and state; scoring a sequence
    in two pieces (the second from the first's state) equals scoring it whole."""
    g = torch.Generator().manual_seed(3)
    lengths = [40, 9, 1, 23]
    ids = torch.randint(3, CFG.vocab_size, (4, 40), generator=g)
    targets = torch.randint(0, CFG.vocab_size, (4, 40), generator=g)
    runner = Runner(perturbed_model(CFG), chunk_size=8)
    out = runner.token_logprobs(ids, targets, lengths=lengths, head_rows=6, last_logits=True)
    for j, n in enumerate(lengths):
        lp, want_state = _want(ref, ids[j:j + 1, :n])
        with torch.no_grad():
            assert torch.allclose(out.last_logits[j], ref(ids[j:j + 1, :n])[0][0, -1], atol=2e-5, rtol=1e-5)
        want = lp.gather(-1, targets[j:j + 1, :n, None])[0, :, 0]
        assert torch.allclose(out.logprobs[j, :n].double(), want, atol=2e-5, rtol=1e-5)
        assert torch.equal(out.greedy[j, :n], lp[0].argmax(-1) == targets[j, :n])
        assert not out.logprobs[j, n:].any() and not out.greedy[j, n:].any()
        _close_states([tuple(t[j:j + 1] for t in layer) for layer in out.state], want_state)
    first = runner.token_logprobs(ids[:1, :17], targets[:1, :17])
    second = runner.token_logprobs(ids[:1, 17:], targets[:1, 17:], state=first.state)
    whole = torch.cat([first.logprobs, second.logprobs], 1)
    assert torch.allclose(whole, out.logprobs[:1], atol=2e-5, rtol=1e-5)


def test_bad_arguments_are_named(ref):
    runner = Runner(perturbed_model(CFG))
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="targets must lie"):
        runner.token_logprobs(ids, torch.full((1, 4), CFG.vocab_size))
    with pytest.raises(ValueError, match="shape of ids"):
        runner.token_logprobs(ids, torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="lengths"):
        runner.token_logprobs(ids, ids, lengths=[5])
    # a padding position may hold any target (it is never read)
    runner.token_logprobs(ids, torch.tensor([[1, 2, -100, -100]]), lengths=[2])
