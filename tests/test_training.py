"""The trainer on CPU: loss falls, exact resume after SIGKILL, 2-process FSDP2 (gloo) == 1 process,
finite-difference gradients, export loadable by transformers, fine-tuning from an export."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fastxlstm.config import XLSTMConfig
from fastxlstm.model import build_model
from fastxlstm.training.config import TrainConfig
from fastxlstm.training.llama import LlamaConfig, build_llama
from fastxlstm.training.trainer import run

from .training_helpers import read_losses, synthetic_data, tiny_config

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _train_subprocess(args: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastxlstm.train", *args], env=ENV, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def pretrained(data, tmp_path_factory):
    """A 40-step in-process run with evaluation, checkpoints and export."""
    tmp = tmp_path_factory.mktemp("pre")
    cfg_path = tiny_config(tmp / "c.yaml", data, tmp / "run", train={"steps": 40}, eval={"every": 20},
                           checkpoint={"every": 20}, export={"enabled": True})
    summary = run(TrainConfig.load(cfg_path))
    return tmp / "run", summary


def test_loss_falls(pretrained):
    run_dir, summary = pretrained
    losses = [loss for _, loss in read_losses(run_dir)]
    assert len(losses) == 40
    assert losses[0] == pytest.approx(torch.log(torch.tensor(61.0)).item(), abs=0.3)  # ~uniform over 61 tokens
    assert sum(losses[-5:]) / 5 < losses[0] - 1.5
    with (run_dir / "eval.csv").open() as fh:
        evals = [float(r["val_loss"]) for r in csv.DictReader(fh)]
    assert len(evals) == 2 and evals[1] < evals[0] < losses[0]
    assert summary["final_val_loss"] == pytest.approx(evals[1], abs=1e-6)
    assert summary["parameters"] > 0 and summary["tokens"] == 40 * 4 * 32
    with (run_dir / "metrics.csv").open() as fh:
        row = next(csv.DictReader(fh))
    assert float(row["grad_norm"]) > 0 and float(row["lr"]) > 0 and float(row["tokens_per_s"]) > 0


def test_kill_and_resume_gives_the_same_losses(data, tmp_path):
    sections = dict(train={"steps": 16}, checkpoint={"every": 4, "keep": 2})
    ref_cfg = tiny_config(tmp_path / "ref.yaml", data, tmp_path / "ref", **sections)
    r = _train_subprocess([str(ref_cfg)])
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = tiny_config(tmp_path / "kill.yaml", data, tmp_path / "kill", **sections)
    r = _train_subprocess([str(cfg), "--set", "train.debug_kill_at_step=10"])
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    ckpts = tmp_path / "kill" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-0000008"
    assert [s for s, _ in read_losses(tmp_path / "kill")][-1] == 10
    # debris of a checkpoint killed half-way must be ignored by resume
    (ckpts / ".step-0000012.tmp").mkdir()
    (ckpts / "step-0000011").mkdir()
    r = _train_subprocess([str(cfg)])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stdout and "step-0000008" in r.stdout
    ref, resumed = read_losses(tmp_path / "ref"), read_losses(tmp_path / "kill")
    assert [s for s, _ in resumed] == list(range(1, 17))
    assert [loss for _, loss in resumed] == pytest.approx([loss for _, loss in ref], rel=1e-6, abs=1e-6)
    assert ref[-1][1] < ref[0][1]


def test_torchrun_two_processes_match_one(data, tmp_path):
    one = tiny_config(tmp_path / "one.yaml", data, tmp_path / "one", train={"steps": 8, "micro_batch_size": 2,
                      "grad_accum": 2}, eval={"every": 8}, export={"enabled": True})
    two = tiny_config(tmp_path / "two.yaml", data, tmp_path / "two", train={"steps": 8, "micro_batch_size": 2,
                      "grad_accum": 1}, eval={"every": 8}, checkpoint={"every": 8}, export={"enabled": True})
    r1 = _train_subprocess([str(one)])
    assert r1.returncode == 0, r1.stderr[-2000:]
    r2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                         "-m", "fastxlstm.train", str(two)], env=ENV, capture_output=True, text=True, timeout=240)
    assert r2.returncode == 0, r2.stderr[-3000:]
    l1, l2 = read_losses(tmp_path / "one"), read_losses(tmp_path / "two")
    assert [s for s, _ in l2] == list(range(1, 9))
    assert [v for _, v in l2] == pytest.approx([v for _, v in l1], rel=1e-4, abs=1e-5)
    # DCP wrote one shard file per rank; both exports hold the same weights
    assert len(list((tmp_path / "two" / "checkpoints" / "step-0000008").glob("*.distcp"))) == 2
    from fastxlstm.checkpoint import load

    m1, m2 = load(tmp_path / "one" / "final"), load(tmp_path / "two" / "final")
    for (n, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-5), n


def _check_gradients(model, loss_fn, eps: float = 1e-3, rtol: float = 1e-2) -> int:
    """For every parameter tensor, the central difference of the loss along its own (unit) autograd
    gradient equals that gradient's norm, and along a random unit direction the directional
    derivative. A gradient scaled wrongly by more than ~1%, or turned by more than ~8 degrees, fails."""
    model.zero_grad()
    loss_fn().backward()
    checked = 0
    gen = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        g = p.grad.clone()
        gnorm = g.norm().item()
        if gnorm < 1e-8:
            continue
        rand = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        for d in (g / gnorm, rand / rand.norm()):
            with torch.no_grad():
                p.add_(d, alpha=eps)
                plus = loss_fn().item()
                p.add_(d, alpha=-2 * eps)
                minus = loss_fn().item()
                p.add_(d, alpha=eps)
            numeric, analytic = (plus - minus) / (2 * eps), (g * d).sum().item()
            assert abs(analytic - numeric) <= rtol * gnorm + 1e-7, (name, analytic, numeric, gnorm)
        checked += 1
    return checked


def _xlstm_loss64(model, ids: torch.Tensor) -> torch.Tensor:
    """Next-token loss with float64 logits (the model's logits() rounds them to float32)."""
    from fastxlstm.model.mlstm_layer import soft_cap

    hidden, _ = model.hidden_states(ids[:, :-1])
    logits = soft_cap(model.lm_head(hidden), model.config.output_logit_soft_cap)
    return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())


def _perturbed_xlstm() -> torch.nn.Module:
    cfg = XLSTMConfig(vocab_size=40, embedding_dim=32, num_blocks=2, num_heads=2, chunk_size=8)
    model = build_model(cfg, dtype=torch.float64, seed=1)
    model.set_backend("reference")
    with torch.no_grad():  # move off the init so gates, norms and biases all matter
        for n, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n)), dtype=p.dtype) * 0.1)
    return model


def test_xlstm_gradients_match_finite_differences():
    model = _perturbed_xlstm()
    ids = torch.randint(0, 40, (2, 22), generator=torch.Generator().manual_seed(0))  # 21 inputs: a partial chunk
    n = _check_gradients(model, lambda: _xlstm_loss64(model, ids))
    assert n == len(list(model.parameters()))


def test_finite_difference_check_catches_a_wrong_gradient():
    model = _perturbed_xlstm()
    ids = torch.randint(0, 40, (2, 22), generator=torch.Generator().manual_seed(0))
    dict(model.named_parameters())["backbone.blocks.1.mlstm_layer.fgate_preact.bias"].register_hook(
        lambda g: g * 1.05)
    with pytest.raises(AssertionError, match="fgate_preact.bias"):
        _check_gradients(model, lambda: _xlstm_loss64(model, ids))


def test_llama_gradients_match_finite_differences():
    model = build_llama(LlamaConfig(vocab_size=40, dim=32, num_layers=2, num_heads=4, ffn_dim=64),
                        dtype=torch.float64, seed=1)
    ids = torch.randint(0, 40, (2, 17), generator=torch.Generator().manual_seed(0))
    assert _check_gradients(model, lambda: model.loss(ids[:, :-1], ids[:, 1:]), rtol=1e-4) == len(
        list(model.parameters()))


def test_export_loads_in_transformers_with_the_same_logits(pretrained, data):
    from transformers import xLSTMForCausalLM

    from fastxlstm.checkpoint import load
    from fastxlstm.training.data import TokenShards
    from fastxlstm.training.loader import eval_batches

    run_dir, summary = pretrained
    ours = load(run_dir / "final")
    hf = xLSTMForCausalLM.from_pretrained(run_dir / "final", dtype=torch.float32).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 50), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, _ = ours(ids)
        b = hf(ids, use_cache=False).logits
    assert (a - b).abs().max().item() < 1e-4
    # the export holds the trained weights: its held-out loss is the trainer's last evaluation
    val = TokenShards(data).split("val")
    with torch.no_grad():
        losses = [F.cross_entropy(ours(x)[0].flatten(0, 1), y.flatten()) for x, y in eval_batches(val, 32, 4, 1024)]
    assert torch.stack(losses).mean().item() == pytest.approx(summary["final_val_loss"], abs=1e-4)


def test_finetune_starts_from_an_exported_directory(pretrained, data, tmp_path):
    run_dir, summary = pretrained
    cfg = tiny_config(tmp_path / "ft.yaml", data, tmp_path / "ft", train={"steps": 3},
                      optim={"lr": 1e-4, "warmup_steps": 0})
    c = TrainConfig.load(cfg, [f"model.init_from={run_dir / 'final'}", "model.preset=null", "model.overrides={}"])
    run(c)
    first = read_losses(tmp_path / "ft")[0][1]
    assert first < summary["final_val_loss"] + 0.5 < 3.0  # far below the ~4.1 of a fresh model
    bad = TrainConfig.load(cfg, [f"model.init_from={run_dir / 'final'}"])
    with pytest.raises(ValueError, match="cannot be combined"):
        run(bad)


def test_train_cli_reports_bad_config(tmp_path):
    from typer.testing import CliRunner

    from fastxlstm.cli import app

    (tmp_path / "c.yaml").write_text("optim: {lrr: 1}\n")
    r = CliRunner().invoke(app, ["train", str(tmp_path / "c.yaml")], env={"COLUMNS": "300"})
    assert r.exit_code == 2 and "unknown config key" in r.output
    r = CliRunner().invoke(app, ["train", str(tmp_path / "missing.yaml")], env={"COLUMNS": "300"})
    assert r.exit_code == 2 and "not found" in r.output


def test_train_rejects_data_with_a_larger_vocabulary(data, tmp_path):
    cfg = tiny_config(tmp_path / "c.yaml", data, tmp_path / "r")
    c = TrainConfig.load(cfg, ["model.overrides={embedding_dim: 32, num_blocks: 1, num_heads: 2, vocab_size: 32}"])
    with pytest.raises(ValueError, match="vocab_size 32"):
        run(c)


def test_activation_checkpointing_gives_the_same_losses(data, tmp_path, monkeypatch):
    import fastxlstm.model.xlstm as xlstm_module

    calls = []
    real_checkpoint = xlstm_module.checkpoint
    monkeypatch.setattr(xlstm_module, "checkpoint", lambda *a, **k: calls.append(1) or real_checkpoint(*a, **k))
    plain = tiny_config(tmp_path / "a.yaml", data, tmp_path / "a", train={"steps": 4})
    ac = tiny_config(tmp_path / "b.yaml", data, tmp_path / "b", train={"steps": 4, "activation_checkpointing": True})
    run(TrainConfig.load(plain))
    assert not calls
    run(TrainConfig.load(ac))
    assert len(calls) == 4 * 2  # every block of every step was recomputed, so the two runs differ in mode
    a, b = read_losses(tmp_path / "a"), read_losses(tmp_path / "b")
    assert [v for _, v in b] == pytest.approx([v for _, v in a], rel=1e-5)


def test_llama_baseline_trains_and_exports(data, tmp_path):
    cfg = tiny_config(tmp_path / "l.yaml", data, tmp_path / "l", train={"steps": 30}, eval={"every": 30},
                      export={"enabled": True})
    summary = run(TrainConfig.load(cfg, ["model.arch=llama"]))
    losses = [v for _, v in read_losses(tmp_path / "l")]
    assert summary["arch"] == "llama" and sum(losses[-5:]) / 5 < losses[0] - 1.0
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "l" / "final" / "model.safetensors"))
    assert sum(t.numel() for t in weights.values()) == summary["parameters"]
