"""LoRA fine-tuning of the embedded model on the shipped instruction set, checked against PEFT on
transformers' xLSTMForCausalLM: held-out loss falls, only adapters change, PEFT reads our adapter
(and we read PEFT's) with the same logits, the merged directory is PEFT's merge, resume is exact,
FSDP2 (gloo) and activation checkpointing give the same losses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastxlstm.checkpoint import load
from fastxlstm.model.lora import LoRAConfig, LoRALinear, apply_lora, read_adapter
from fastxlstm.training.chat_data import prepare_chat
from fastxlstm.training.checkpointing import read_metadata
from fastxlstm.training.config import TrainConfig
from fastxlstm.training.trainer import Trainer

from .training_helpers import read_losses, synthetic_data, tiny_config

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "xlstm-shakespeare-10m"
INSTRUCT = ROOT / "data" / "instructions" / "shakespeare-instruct.jsonl"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q", "k", "v", "ogate_preact", "out_proj",
                                                                 "proj_up_gate", "proj_up", "proj_down"]}


def _hf_base():
    return transformers.xLSTMForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()


def _ids(n: int = 60) -> torch.Tensor:
    return torch.randint(3, 8192, (2, n), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A short LoRA fine-tune of the embedded model on part of the instruction set, merged export on (kept
    small: 8 steps of 2 x 64 tokens, the held-out loss on 512 tokens)."""
    tmp = tmp_path_factory.mktemp("lora")
    part = tmp / "instruct.jsonl"
    part.write_text("".join(INSTRUCT.read_text().splitlines(keepends=True)[:240]))
    prepare_chat(MODEL, [part], tmp / "data", "instruct", val_fraction=0.2)
    cfg_path = tiny_config(
        tmp / "c.yaml", tmp / "data", tmp / "run",
        model={"preset": None, "init_from": str(MODEL), "overrides": {}, "backend": "reference", "lora": LORA},
        optim={"lr": 4e-3, "warmup_steps": 1, "weight_decay": 0.0},
        train={"steps": 8, "micro_batch_size": 2}, eval={"every": 8, "tokens": 512, "batch_size": 8},
        export={"enabled": True, "merged": True})
    trainer = Trainer(TrainConfig.load(cfg_path, ["data.seq_len=64"]))
    before = trainer.evaluate()
    summary = trainer.train()
    return trainer, before, summary, tmp / "run"


def test_lora_lowers_heldout_loss_and_trains_only_the_adapters(lora_run):
    trainer, before, summary, run_dir = lora_run
    assert summary["final_val_loss"] < before - 0.2, (before, summary["final_val_loss"])
    n_lora = sum(p.numel() for n, p in trainer.model.named_parameters() if ".lora_" in n)
    assert summary["trainable_parameters"] == n_lora < summary["parameters"] // 10
    base = load(MODEL).state_dict()
    state = trainer.model.state_dict()
    for name, t in base.items():
        assert torch.equal(state[name], t), name  # bit-identical: the base never moved
    moved = [n for n, t in state.items() if n.endswith("lora_B.weight") and t.abs().sum() > 0]
    assert len(moved) == 8 * 8  # every adapted projection of every block learned something
    assert (run_dir / "adapter" / "adapter_config.json").exists() and (run_dir / "final" / "config.json").exists()


def test_peft_reads_our_adapter_with_the_same_logits(lora_run):
    trainer, _, _, run_dir = lora_run
    hf = peft.PeftModel.from_pretrained(_hf_base(), run_dir / "adapter").eval()
    ids = _ids()
    merged = load(MODEL, adapter=run_dir / "adapter")
    fused = load(MODEL, adapter=run_dir / "adapter", weight_mode="fused")
    trainer.model.eval()
    with torch.no_grad():
        ref = hf(ids, use_cache=False).logits
        for ours in (merged, fused, trainer.model):
            assert (ours(ids)[0] - ref).abs().max().item() < 1e-4
        assert (load(MODEL)(ids)[0] - ref).abs().max().item() > 1e-2  # the adapter matters
    trainer.model.train()


def test_merged_directory_is_peft_merge_and_loads_in_transformers(lora_run):
    _, _, summary, run_dir = lora_run
    assert summary["merged_dir"] == str(run_dir / "final")
    ref = peft.PeftModel.from_pretrained(_hf_base(), run_dir / "adapter").merge_and_unload().state_dict()
    from safetensors.torch import load_file

    ours = load_file(str(run_dir / "final" / "model.safetensors"))
    assert set(ours) == set(ref)
    for name, t in ref.items():
        assert torch.allclose(ours[name], t, rtol=0, atol=1e-6), name
    hf = transformers.xLSTMForCausalLM.from_pretrained(run_dir / "final", dtype=torch.float32).eval()
    with torch.no_grad():
        a = load(MODEL, adapter=run_dir / "adapter")(_ids())[0]
        assert (hf(_ids(), use_cache=False).logits - a).abs().max().item() < 1e-4


def test_llm_and_serve_take_the_adapter(lora_run, monkeypatch):
    from typer.testing import CliRunner

    from fastxlstm import LLM
    from fastxlstm.cli import app
    from fastxlstm.serving import app as serving_app

    _, _, _, run_dir = lora_run
    prompts = ["Who speaks these words? It is no matter; let no images", "Give the line after: Friends, Romans,"]
    kw = dict(max_new_tokens=12, temperature=0.0)
    with_adapter = [r.token_ids for r in LLM(str(MODEL), adapter=run_dir / "adapter", device="cpu").generate(
        prompts, **kw)]
    assert with_adapter == [r.token_ids for r in LLM(str(run_dir / "final"), device="cpu").generate(prompts, **kw)]
    assert with_adapter != [r.token_ids for r in LLM(str(MODEL), device="cpu").generate(prompts, **kw)]
    with pytest.raises(ValueError, match="path"):
        LLM(load(MODEL), adapter=run_dir / "adapter")

    seen = {}

    def capture(net, tok, config, template, **kwargs):
        seen["net"] = net
        raise SystemExit(0)

    monkeypatch.setattr(serving_app, "build_app", capture)
    result = CliRunner().invoke(app, ["serve", "--model", str(MODEL), "--adapter", str(run_dir / "adapter"),
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    ids = _ids()
    with torch.no_grad():
        ref = load(MODEL, adapter=run_dir / "adapter")(ids)[0]
        assert (seen["net"](ids)[0] - ref).abs().max().item() < 1e-5
    bad = CliRunner().invoke(app, ["serve", "--model", str(MODEL), "--adapter", str(run_dir), "--device", "cpu"])
    assert bad.exit_code != 0 and "adapter_config.json" in bad.output


def test_we_read_an_adapter_peft_wrote(tmp_path):
    cfg = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["q", "v", "proj_down", "igate_preact"],
                          init_lora_weights=False, use_rslora=True)
    torch.manual_seed(0)
    hf = peft.get_peft_model(_hf_base(), cfg).eval()
    hf.save_pretrained(tmp_path / "a")
    ids = _ids()
    with torch.no_grad():
        ref = hf(ids, use_cache=False).logits
        for mode in ("single", "fused"):
            ours = load(MODEL, adapter=tmp_path / "a", weight_mode=mode)
            assert (ours(ids)[0] - ref).abs().max().item() < 1e-4, mode
        assert (load(MODEL)(ids)[0] - ref).abs().max().item() > 1e-3
    # unmerged: our LoRALinear on the base, with PEFT's tensors, computes what PEFT computes
    lcfg, pairs = read_adapter(tmp_path / "a")
    model = load(MODEL)
    apply_lora(model, lcfg)
    with torch.no_grad():
        for name, (a, b) in pairs.items():
            mod = model.get_submodule(name)
            assert isinstance(mod, LoRALinear)
            mod.lora_A.weight.copy_(a)
            mod.lora_B.weight.copy_(b)
        assert (model(ids)[0] - ref).abs().max().item() < 1e-4


def test_adapter_errors(tmp_path, lora_run):
    _, _, _, run_dir = lora_run
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load(MODEL, adapter=tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_model.safetensors").write_bytes((run_dir / "adapter" / "adapter_model.safetensors").read_bytes())
    conf = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**conf, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora"):
        load(MODEL, adapter=bad)
    (bad / "adapter_config.json").write_text(json.dumps({**conf, "r": 4}))
    with pytest.raises(ValueError, match="r=4"):
        load(MODEL, adapter=bad)
    with pytest.raises(ValueError, match="target_modules"):
        LoRAConfig(target_modules=["lm_head"])
    with pytest.raises(ValueError, match="random"):
        load("random:xlstm-tiny", adapter=run_dir / "adapter")


def test_save_adapter_writes_a_readable_directory_atomically(tmp_path, tiny_tokenizer_dir, monkeypatch):
    """The adapter directory is written as save_pretrained writes a model: staged next to it and swapped in, with
    the umask's permissions (0755 / 0644, not mkdtemp's 0700 or safetensors' 0600), the tokenizer files copied;
    a failed write keeps the old directory and leaves no temporary one."""
    from fastxlstm.config import XLSTMConfig
    from fastxlstm.model import build_model
    from fastxlstm.model import lora as lora_mod

    model = build_model(XLSTMConfig(vocab_size=320, embedding_dim=32, num_blocks=1, num_heads=2))
    cfg = LoRAConfig(r=2, target_modules=["q", "v"])
    apply_lora(model, cfg)
    out = tmp_path / "adapter"
    old = os.umask(0o022)
    try:
        lora_mod.save_adapter(model.state_dict(), cfg, out, "base", tiny_tokenizer_dir)
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    assert sorted(f.name for f in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                      "tokenizer.json"]
    assert all(f.stat().st_mode & 0o777 == 0o644 for f in out.iterdir())
    assert read_adapter(out)[0].r == 2

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(lora_mod, "copy_tokenizer_files", boom)
    with pytest.raises(OSError, match="disk full"):
        lora_mod.save_adapter(model.state_dict(), cfg, out, "base", tiny_tokenizer_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"] and (out / "tokenizer.json").exists()


# ------------------------------------------------------------------- resume, FSDP2, checkpointing
def _lora_tiny(tmp_path: Path, data: Path, name: str, **sections) -> Path:
    sections.setdefault("model", {})
    sections["model"] = {"preset": None, "backend": "reference", "lora": {**LORA, "r": 4, "dropout": 0.1},
                         "overrides": {"embedding_dim": 32, "num_blocks": 2, "num_heads": 2, "chunk_size": 16},
                         **sections["model"]}
    return tiny_config(tmp_path / f"{name}.yaml", data, tmp_path / name, **sections)


def _train(args: list[str], torchrun: int = 0) -> subprocess.CompletedProcess:
    launcher = (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(torchrun)]
                if torchrun else [])
    return subprocess.run([sys.executable, *launcher, "-m", "fastxlstm.train", *args], env=ENV, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def windows(tmp_path_factory):
    return synthetic_data(tmp_path_factory.mktemp("windows"))


def test_lora_kill_and_resume_is_exact(windows, tmp_path):
    sections = dict(train={"steps": 10}, checkpoint={"every": 3, "keep": 2}, optim={"lr": 3e-2, "warmup_steps": 2},
                    export={"enabled": True})
    r = _train([str(_lora_tiny(tmp_path, windows, "ref", **sections))])
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = _lora_tiny(tmp_path, windows, "kill", **sections)
    r = _train([str(cfg), "--set", "train.debug_kill_at_step=7"])
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    r = _train([str(cfg)])
    assert r.returncode == 0 and "step-0000006" in r.stdout, r.stderr[-2000:]
    ref, resumed = read_losses(tmp_path / "ref"), read_losses(tmp_path / "kill")
    assert [s for s, _ in resumed] == list(range(1, 11))
    assert [v for _, v in resumed] == pytest.approx([v for _, v in ref], rel=1e-6, abs=1e-6)
    assert ref[-1][1] < ref[0][1] - 0.1
    a, b = (read_adapter(tmp_path / d / "adapter")[1] for d in ("ref", "kill"))
    for name in a:
        assert torch.equal(a[name][1], b[name][1]), name
    # the frozen base is not in the DCP checkpoint (it comes from the config on resume): adapters and their
    # optimizer state only
    keys = set(read_metadata(tmp_path / "kill" / "checkpoints" / "step-0000009").state_dict_metadata)
    model_keys = {k for k in keys if k.startswith("model.")}
    assert model_keys and all(".lora_A." in k or ".lora_B." in k for k in model_keys), sorted(model_keys)[:5]
    assert not any("embeddings" in k or k.endswith("mlstm_layer.q.weight") for k in keys)


def test_lora_fsdp_two_processes_and_activation_checkpointing_match_one(windows, tmp_path):
    base = dict(optim={"lr": 3e-2, "warmup_steps": 2}, export={"enabled": True})
    one = _lora_tiny(tmp_path, windows, "one", train={"steps": 6, "micro_batch_size": 2, "grad_accum": 2}, **base)
    two = _lora_tiny(tmp_path, windows, "two", train={"steps": 6, "micro_batch_size": 2, "grad_accum": 1,
                                                      "activation_checkpointing": True}, **base)
    r1 = _train([str(one), "--set", "model.lora.dropout=0.0"])
    assert r1.returncode == 0, r1.stderr[-2000:]
    r2 = _train([str(two), "--set", "model.lora.dropout=0.0"], torchrun=2)
    assert r2.returncode == 0, r2.stderr[-3000:]
    l1, l2 = read_losses(tmp_path / "one"), read_losses(tmp_path / "two")
    assert [v for _, v in l2] == pytest.approx([v for _, v in l1], rel=1e-4, abs=1e-5)
    assert l1[-1][1] < l1[0][1]
    a, b = (read_adapter(tmp_path / d / "adapter")[1] for d in ("one", "two"))
    assert set(a) == set(b) and len(a) == 2 * 8
    for name in a:
        assert torch.allclose(a[name][1], b[name][1], rtol=1e-3, atol=1e-5), name
