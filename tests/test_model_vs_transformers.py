"""Logits and states of fastxlstm equal those of transformers' xLSTMForCausalLM (native path)."""

from __future__ import annotations

import pytest
import torch

from fastxlstm.config import XLSTMConfig
from fastxlstm.model import XLSTMForCausalLM

from .helpers import hf_twin, perturbed_model

CONFIGS = {
    "base": dict(vocab_size=320, embedding_dim=128, num_blocks=2, num_heads=2),
    "4heads": dict(vocab_size=320, embedding_dim=256, num_blocks=2, num_heads=4),
    "factors": dict(vocab_size=320, embedding_dim=256, num_blocks=1, num_heads=2, qk_dim_factor=0.25,
                    v_dim_factor=0.5, ffn_proj_factor=1.5),
    "caps": dict(vocab_size=320, embedding_dim=128, num_blocks=2, num_heads=2, gate_soft_cap=5.0,
                 output_logit_soft_cap=8.0),
    "bias_1head": dict(vocab_size=320, embedding_dim=128, num_blocks=1, num_heads=1, use_bias=True),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("weight_mode", ["single", "fused"])
def test_logits_match_transformers(name, weight_mode):
    cfg = XLSTMConfig(**CONFIGS[name], weight_mode=weight_mode)
    model = perturbed_model(cfg, seed=len(name) + 7)
    hf = hf_twin(model)
    g = torch.Generator().manual_seed(0)
    for seq in (1, 7, 63, 64, 65, 200):
        ids = torch.randint(0, cfg.vocab_size, (2, seq), generator=g)
        with torch.no_grad():
            ours, _ = model(ids)
            theirs = hf(ids, use_cache=False).logits
        assert ours.shape == theirs.shape == (2, seq, cfg.vocab_size)
        assert (ours - theirs).abs().max().item() <= 1e-4, (name, weight_mode, seq)


def test_final_state_matches_transformers_cache():
    cfg = XLSTMConfig(**CONFIGS["base"])
    model = perturbed_model(cfg)
    hf = hf_twin(model)
    ids = torch.randint(0, cfg.vocab_size, (2, 77))
    with torch.no_grad():
        _, state = model(ids)
        cache = hf(ids, use_cache=True).cache
    for layer, (c, n, m) in enumerate(state):
        hc, hn, hm = cache.rnn_state[layer]
        torch.testing.assert_close(c, hc, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(n, hn, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(m, hm.squeeze(-1), atol=1e-5, rtol=1e-5)


def test_prefill_then_steps_equals_one_forward():
    cfg = XLSTMConfig(**CONFIGS["4heads"], weight_mode="fused")
    model = perturbed_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (3, 90))
    with torch.no_grad():
        full, full_state = model(ids)
        logits, state = model(ids[:, :70])
        step_logits = [logits]
        for t in range(70, 90):
            out, state = model(ids[:, t:t + 1], state)
            step_logits.append(out)
    torch.testing.assert_close(torch.cat(step_logits, 1), full, atol=1e-4, rtol=1e-4)
    for a, b in zip(state, full_state):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)


def test_parameter_count_matches_config():
    for name, kw in CONFIGS.items():
        cfg = XLSTMConfig(**kw)
        assert XLSTMForCausalLM(cfg).num_parameters() == cfg.num_parameters(), name


def test_init_follows_paper():
    from fastxlstm.model import build_model

    cfg = XLSTMConfig(**CONFIGS["4heads"])
    model = build_model(cfg, seed=3)
    layer = model.backbone.blocks[0].mlstm_layer
    assert torch.all(layer.igate_preact.bias == -10.0)
    torch.testing.assert_close(layer.fgate_preact.bias, torch.linspace(3.0, 6.0, cfg.num_heads))
    assert torch.all(layer.igate_preact.weight == 0) and torch.all(layer.fgate_preact.weight == 0)
    std = layer.q.weight.std().item()
    assert abs(std - (2 / (5 * cfg.embedding_dim)) ** 0.5) < 0.1 * std
    fused = build_model(cfg.replace(weight_mode="fused"), seed=3).backbone.blocks[0].mlstm_layer
    assert torch.all(fused.ifgate_preact.bias[: cfg.num_heads] == -10.0)
    biased = build_model(cfg.replace(use_bias=True), seed=3)  # built from uninitialised (to_empty) memory
    norms = [(n, p) for n, p in biased.named_parameters() if "norm" in n]
    assert len(norms) == 3 * 2 * cfg.num_blocks + 1  # (norm_mlstm, multihead_norm, norm_ffn) x (weight, bias), out_norm
    for name, p in norms:
        assert torch.all(p == (1.0 if name.endswith("weight") else 0.0)), name
