"""Generation v0: greedy equals transformers' generate; sampling; bad input gives clear errors."""

from __future__ import annotations

import pytest
import torch

from fastxlstm.config import XLSTMConfig
from fastxlstm.generation import generate, sample
from fastxlstm.generation.sampling import filter_logits

from .helpers import hf_twin, perturbed_model

CFG = XLSTMConfig(vocab_size=320, embedding_dim=128, num_blocks=2, num_heads=2, eos_token_id=None)


@pytest.mark.parametrize("mode", ["single", "fused"])
@pytest.mark.parametrize("prompt_len", [1, 9, 70])
def test_greedy_equals_transformers_generate(mode, prompt_len):
    model = perturbed_model(CFG.replace(weight_mode=mode), seed=prompt_len)
    hf = hf_twin(model)
    prompt = torch.randint(3, CFG.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    ours = generate(model, prompt, max_new_tokens=24)
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=1,
                             min_new_tokens=24)
    assert ours.tolist() == theirs[:, prompt_len:].tolist()


def test_batch_of_equal_length_prompts_matches_single():
    model = perturbed_model(CFG)
    prompts = torch.randint(3, CFG.vocab_size, (3, 12))
    batch = generate(model, prompts, max_new_tokens=10)
    for row in range(3):
        assert batch[row].tolist() == generate(model, prompts[row].tolist(), max_new_tokens=10)[0].tolist()


def test_eos_stops_and_pads_finished_rows():
    model = perturbed_model(CFG)
    prompt = [5, 6, 7]
    free = generate(model, prompt, max_new_tokens=12)[0].tolist()
    eos = free[4]
    out = generate(model, prompt, max_new_tokens=12, eos_token_id=eos)[0].tolist()
    assert out == free[: free.index(eos) + 1]


def test_seeded_sampling_is_reproducible():
    model = perturbed_model(CFG)
    a = generate(model, [5, 6, 7], max_new_tokens=16, temperature=1.0, top_p=0.9, seed=123)
    b = generate(model, [5, 6, 7], max_new_tokens=16, temperature=1.0, top_p=0.9, seed=123)
    c = generate(model, [5, 6, 7], max_new_tokens=16, temperature=1.0, top_p=0.9, seed=124)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_filters_and_sampler():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[True, False, False, True]]
    probs = logits.softmax(-1)[0]  # ~[.09, .66, .24, .03]
    kept = ~torch.isinf(filter_logits(logits, top_p=0.7))
    assert kept.tolist() == [[False, True, True, False]] and probs[1] < 0.7
    assert sample(logits).tolist() == [1]
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(logits, temperature=1.0, top_k=1, generator=g) for _ in range(20)])
    assert (draws == 1).all()
    with pytest.raises(ValueError, match="temperature"):
        sample(logits, temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        sample(logits, temperature=1, top_p=0)


def test_bad_inputs_have_clear_errors():
    model = perturbed_model(CFG)
    with pytest.raises(ValueError, match="token id 320 is out of range"):
        model(torch.tensor([[1, 320]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[-1, 3]]))
    with pytest.raises(ValueError, match="empty"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model, [], max_new_tokens=3)
    with pytest.raises(TypeError, match="integer tensor"):
        model(torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match=r"shape \[batch, seq\]"):
        model(torch.tensor([[[1, 2]]]))
    with pytest.raises(ValueError, match="state has 1 layers"):
        _, state = model(torch.tensor([[1, 2]]))
        model(torch.tensor([[1]]), state[:1])
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [1, 2], max_new_tokens=-1)
