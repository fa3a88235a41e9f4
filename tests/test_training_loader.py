"""Window sampler determinism and partitioning; schedules; weight-decay groups; config parsing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastxlstm.config import XLSTMConfig
from fastxlstm.model import build_model
from fastxlstm.training.config import TrainConfig
from fastxlstm.training.data import TokenShards
from fastxlstm.training.llama import LlamaConfig, build_llama
from fastxlstm.training.loader import WindowSampler, eval_batches
from fastxlstm.training.optim import lr_at, param_groups

from .training_helpers import write_shards


@pytest.fixture
def shards(tmp_path):
    rng = np.random.default_rng(0)
    return TokenShards(write_shards(tmp_path / "d", rng.integers(0, 1000, 5000), rng.integers(0, 1000, 700), 1000))


def test_windows_are_deterministic_per_seed_step_rank(shards):
    s = WindowSampler(shards.split("train"), 16, 4, grad_accum=2, world_size=2, rank=1, seed=3)
    again = WindowSampler(shards.split("train"), 16, 4, grad_accum=2, world_size=2, rank=1, seed=3)
    x1, y1 = s.batch(7, 1)
    x2, y2 = again.batch(7, 1)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.shape == (4, 16) and x1.dtype == torch.int64
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # labels are inputs shifted by one
    assert not torch.equal(s.batch(8, 1)[0], x1)  # a different step draws other windows
    other_seed = WindowSampler(shards.split("train"), 16, 4, grad_accum=2, world_size=2, rank=1, seed=4)
    assert not torch.equal(other_seed.batch(7, 1)[0], x1)
    # windows are real slices of the data
    flat = np.asarray(shards.split("train").shards[0]).astype(np.int64)
    row = x1[0].numpy()
    starts = [i for i in range(len(flat) - 16) if flat[i] == row[0] and np.array_equal(flat[i : i + 16], row)]
    assert starts


def test_ranks_and_accumulation_partition_the_same_global_batch(shards):
    split = shards.split("train")
    single = WindowSampler(split, 8, 2, grad_accum=4, world_size=1, rank=0, seed=1)
    ranks = [WindowSampler(split, 8, 2, grad_accum=2, world_size=2, rank=r, seed=1) for r in range(2)]
    whole = torch.cat([single.batch(5, a)[0] for a in range(4)])
    parts = torch.cat([ranks[r].batch(5, a)[0] for a in range(2) for r in range(2)])
    assert torch.equal(whole, parts)
    per_rank = [torch.cat([ranks[r].batch(5, a)[0] for a in range(2)]) for r in range(2)]
    assert not torch.equal(per_rank[0], per_rank[1])


def test_eval_batches_split_evenly_across_ranks(shards):
    val = shards.split("val")
    one = list(eval_batches(val, 32, 2, 10_000, world_size=1, rank=0))
    two = [list(eval_batches(val, 32, 2, 10_000, world_size=2, rank=r)) for r in range(2)]
    assert len(two[0]) == len(two[1])
    # rank r takes every other window of the same evenly divisible set (batch 4 = 2 ranks x 2)
    four = torch.cat([x for x, _ in eval_batches(val, 32, 4, 10_000)])
    for r in range(2):
        assert torch.equal(torch.cat([x for x, _ in two[r]]), four[r::2])
    n_two = sum(b[0].shape[0] for r in two for b in r)
    assert n_two == (699 // 32) // 4 * 4 and sum(b[0].shape[0] for b in one) == (699 // 32) // 2 * 2
    with pytest.raises(ValueError, match="too small"):
        list(eval_batches(val, 512, 4, 10_000, world_size=2))


def test_sampler_errors(shards):
    with pytest.raises(ValueError, match="no shard"):
        WindowSampler(shards.split("val"), 5000, 1)
    with pytest.raises(ValueError, match="rank"):
        WindowSampler(shards.split("train"), 8, 1, world_size=2, rank=2)
    with pytest.raises(KeyError):
        shards.split("test")


def test_schedules():
    kw = dict(lr=1.0, total_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, **kw) == pytest.approx(0.1) and lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw, schedule="cosine") == pytest.approx(1.0)
    assert lr_at(55, **kw, schedule="cosine") == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(100, **kw, schedule="cosine") == pytest.approx(0.1)
    assert lr_at(79, **kw, schedule="wsd", decay_fraction=0.2) == 1.0
    assert lr_at(89, **kw, schedule="wsd", decay_fraction=0.2) == pytest.approx(1.0 - 0.9 * 0.5)
    assert lr_at(99, **kw, schedule="wsd", decay_fraction=0.2) == pytest.approx(0.1)
    assert lr_at(50, **kw, schedule="constant") == 1.0
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_at(50, **kw, schedule="exp")


def test_weight_decay_on_matrices_only():
    model = build_model(XLSTMConfig(vocab_size=64, embedding_dim=32, num_blocks=2, num_heads=2))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "backbone.blocks.0.mlstm_layer.igate_preact.bias" in no_decay_names
    assert "backbone.blocks.0.norm_mlstm.weight" in no_decay_names
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_llama_baseline_matches_xlstm_parameter_count():
    for xcfg in (XLSTMConfig(vocab_size=16384, embedding_dim=768, num_blocks=12, num_heads=4),
                 XLSTMConfig(vocab_size=512, embedding_dim=128, num_blocks=2, num_heads=2)):
        lcfg = LlamaConfig.matching(xcfg)
        assert abs(lcfg.num_parameters() - xcfg.num_parameters()) / xcfg.num_parameters() < 0.01
    small = LlamaConfig.matching(XLSTMConfig(vocab_size=512, embedding_dim=128, num_blocks=2, num_heads=2))
    model = build_llama(small)
    assert model.num_parameters() == small.num_parameters()
    logits, _ = model(torch.randint(0, 512, (2, 9)))
    assert logits.shape == (2, 9, 512)


def test_llama_is_causal():
    model = build_llama(LlamaConfig(vocab_size=50, dim=32, num_layers=2, num_heads=4, ffn_dim=64)).eval()
    ids = torch.randint(0, 50, (1, 12))
    changed = ids.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 50
    with torch.no_grad():
        a, _ = model(ids)
        b, _ = model(changed)
    assert torch.allclose(a[:, :8], b[:, :8], atol=1e-6) and not torch.allclose(a[:, 8:], b[:, 8:])


def test_config_parsing(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim: {lr: 1e-3, betas: [0.9, 0.99]}\ntrain: {steps: 5}\n")
    cfg = TrainConfig.load(path, ["train.micro_batch_size=3", "model.overrides={embedding_dim: 32}"])
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float) and cfg.optim.betas == (0.9, 0.99)
    assert cfg.train.steps == 5 and cfg.train.micro_batch_size == 3
    assert cfg.model.overrides == {"embedding_dim": 32}
    path.write_text("optim: {lrr: 1}\n")
    with pytest.raises(ValueError, match="unknown config key.*lrr"):
        TrainConfig.load(path)
    path.write_text("train: {steps: many}\n")
    with pytest.raises(ValueError, match="train.steps: expected int"):
        TrainConfig.load(path)
    with pytest.raises(ValueError, match="section.key=value"):
        TrainConfig.load(tmp_path / "c.yaml", ["steps"])


def test_shipped_configs_load():
    from pathlib import Path

    from fastxlstm.config import preset

    paths = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert len(paths) >= 6
    for path in paths:
        cfg = TrainConfig.load(path)
        if cfg.model.preset:
            assert preset(cfg.model.preset).num_blocks > 0, path
