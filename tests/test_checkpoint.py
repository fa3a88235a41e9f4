"""Checkpoint I/O: HF layout both ways with transformers, sharding, weight modes, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastxlstm
from fastxlstm.checkpoint import CheckpointError, load, save_pretrained
from fastxlstm.config import XLSTMConfig

from .helpers import hf_twin, perturbed_model

CFG = XLSTMConfig(vocab_size=320, embedding_dim=128, num_blocks=2, num_heads=2)


def logits_of(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out[0] if isinstance(out, tuple) else out.logits


@pytest.fixture
def ids():
    return torch.randint(0, CFG.vocab_size, (2, 70), generator=torch.Generator().manual_seed(0))


def test_transformers_dir_loads_in_fastxlstm(tmp_path, ids):
    model = perturbed_model(CFG)
    hf = hf_twin(model)
    hf.save_pretrained(tmp_path / "hf")
    for mode in ("single", "fused"):
        ours = fastxlstm.load(tmp_path / "hf", weight_mode=mode)
        assert ours.config.weight_mode == mode
        assert (logits_of(ours, ids) - hf(ids, use_cache=False).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("mode", ["single", "fused"])
def test_fastxlstm_dir_loads_in_transformers(tmp_path, ids, mode):
    from transformers import AutoModelForCausalLM

    model = perturbed_model(CFG.replace(weight_mode=mode))
    model.save_pretrained(str(tmp_path / "ours"))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert (logits_of(model, ids) - hf(ids, use_cache=False).logits).abs().max() <= 1e-4
    again = load(tmp_path / "ours", weight_mode=mode)
    assert torch.equal(logits_of(again, ids), logits_of(model, ids))


def _write_fused_checkpoint(model, directory):
    """A checkpoint in the fused layout (what a fused-mode writer would produce)."""
    directory.mkdir()
    model.config.to_json(directory / "config.json")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})


def test_fused_checkpoint_loads_into_both_layouts(tmp_path, ids):
    fused = perturbed_model(CFG.replace(weight_mode="fused"))
    _write_fused_checkpoint(fused, tmp_path / "f")
    assert torch.equal(logits_of(load(tmp_path / "f"), ids), logits_of(fused, ids))
    single = load(tmp_path / "f", weight_mode="single")
    assert single.config.weight_mode == "single"
    torch.testing.assert_close(logits_of(single, ids), logits_of(fused, ids), atol=1e-4, rtol=1e-4)
    assert torch.equal(single.backbone.blocks[1].mlstm_layer.v.weight,
                       fused.backbone.blocks[1].mlstm_layer.qkv_opreact.weight[128:256])


def test_wrong_fused_shape_is_named_before_loading(tmp_path):
    fused = perturbed_model(CFG.replace(weight_mode="fused"))
    _write_fused_checkpoint(fused, tmp_path / "f")
    path = tmp_path / "f" / "model.safetensors"
    tensors = load_file(str(path))
    key = "backbone.blocks.0.mlstm_layer.qkv_opreact.weight"
    tensors[key] = tensors[key][:-1]
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"wrong shapes: backbone\.blocks\.0\.mlstm_layer\.qkv_opreact"):
        load(tmp_path / "f", weight_mode="single")


def test_sharded_round_trip(tmp_path, ids):
    model = perturbed_model(CFG)
    save_pretrained(model, tmp_path / "m", max_shard_bytes=200_000)
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and all((tmp_path / "m" / s).exists() for s in shards)
    assert not (tmp_path / "m" / "model.safetensors").exists()
    assert torch.equal(logits_of(load(tmp_path / "m"), ids), logits_of(model, ids))
    fused = load(tmp_path / "m", weight_mode="fused")  # one fused GEMM may round differently
    torch.testing.assert_close(logits_of(fused, ids), logits_of(model, ids), atol=1e-4, rtol=1e-4)


def test_save_is_atomic_and_overwrites(tmp_path):
    model = perturbed_model(CFG)
    save_pretrained(model, tmp_path / "m")
    save_pretrained(model, tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp or old dirs left behind

    class Boom(RuntimeError):
        pass

    def boom(*a, **k):
        raise Boom

    import fastxlstm.model.hf_layout as ck

    orig = ck.save_file
    ck.save_file = boom
    other = perturbed_model(CFG.replace(num_blocks=3), seed=5)  # a save that would change config.json too
    try:
        with pytest.raises(Boom):
            save_pretrained(other, tmp_path / "m")
    finally:
        ck.save_file = orig
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    ids = torch.randint(0, CFG.vocab_size, (1, 9))
    assert torch.equal(logits_of(load(tmp_path / "m"), ids), logits_of(model, ids))  # previous model intact


def _corrupt(tmp_path, edit):
    model = perturbed_model(CFG)
    save_pretrained(model, tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return tmp_path / "m"


def test_missing_tensor_is_named(tmp_path):
    d = _corrupt(tmp_path, lambda t: t.pop("backbone.blocks.1.mlstm_layer.k.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors: backbone\.blocks\.1\.mlstm_layer\.k\.weight"):
        load(d)
    with pytest.raises(CheckpointError, match="missing tensors"):
        load(d, weight_mode="fused")


def test_unexpected_tensor_is_named(tmp_path):
    d = _corrupt(tmp_path, lambda t: t.__setitem__("backbone.blocks.0.extra.weight", torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"unexpected tensors: backbone\.blocks\.0\.extra\.weight"):
        load(d)


def test_wrong_shape_is_named(tmp_path):
    d = _corrupt(tmp_path, lambda t: t.__setitem__("lm_head.weight", torch.zeros(10, 128)))
    with pytest.raises(CheckpointError, match=r"wrong shapes: lm_head\.weight: checkpoint \[10, 128\]"):
        load(d)


def test_config_mismatch_is_reported(tmp_path):
    model = perturbed_model(CFG)
    save_pretrained(model, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["num_blocks"] = cfg["num_hidden_layers"] = 3
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"missing tensors: backbone\.blocks\.2\."):
        load(tmp_path / "m")


def test_missing_files_have_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load(tmp_path / "empty")
    CFG.to_json(tmp_path / "empty" / "config.json")
    with pytest.raises(FileNotFoundError, match="no safetensors"):
        load(tmp_path / "empty")
    (tmp_path / "empty" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="shard"):
        load(tmp_path / "empty")


def test_hub_id_offline_without_cache_is_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with pytest.raises(FileNotFoundError, match="not a local directory, and fetching it from the hub failed"):
        load("NX-AI/xLSTM-7b-does-not-exist")


def test_no_pickle_files_written(tmp_path):
    save_pretrained(perturbed_model(CFG), tmp_path / "m")
    assert {p.suffix for p in (tmp_path / "m").iterdir()} <= {".json", ".safetensors"}
