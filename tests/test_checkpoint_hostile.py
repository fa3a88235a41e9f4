"""Damaged and hostile model directories: every failure names the file (and tensor or field); shard paths
cannot leave the directory; NaN/inf weights are refused; the official FFN width and out-norm bias load;
directories saved with the old FFN rounding still load; saved directories get normal permissions."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastxlstm
from fastxlstm.checkpoint import CheckpointError, load, save_pretrained
from fastxlstm.config import XLSTMConfig

from .helpers import perturbed_model

CFG = XLSTMConfig(vocab_size=64, embedding_dim=64, num_blocks=1, num_heads=2)
IDS = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(0))


def _logits(model):
    with torch.no_grad():
        return model(IDS)[0]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "model"
    save_pretrained(perturbed_model(CFG), path)
    return path


@pytest.fixture
def copy(saved, tmp_path):
    import shutil

    return shutil.copytree(saved, tmp_path / "model")


def _header(data: bytes) -> tuple[int, dict]:
    n = struct.unpack("<Q", data[:8])[0]
    return n, json.loads(data[8:8 + n])


@pytest.mark.parametrize("damage", ["empty", "header_cut", "header_len_huge", "header_len_short", "header_garbled",
                                    "data_cut", "trailing_bytes", "offsets_lie"])
def test_damaged_safetensors_names_the_file(copy, damage):
    f = copy / "model.safetensors"
    data = f.read_bytes()
    n, header = _header(data)
    if damage == "empty":
        data = b""
    elif damage == "header_cut":
        data = data[:8 + n // 2]
    elif damage == "header_len_huge":
        data = struct.pack("<Q", 2**40) + data[8:]
    elif damage == "header_len_short":
        data = struct.pack("<Q", n - 7) + data[8:]
    elif damage == "header_garbled":
        data = data[:8] + b"{" * n + data[8 + n:]
    elif damage == "data_cut":
        data = data[:-1000]
    elif damage == "trailing_bytes":
        data = data + b"\0" * 16
    else:  # a tensor's data offsets claim more bytes than its shape needs
        key = next(k for k in header if k != "__metadata__")
        header[key]["data_offsets"][1] += 4
        raw = json.dumps(header).encode().ljust(n)
        data = struct.pack("<Q", len(raw)) + raw + data[8 + n:]
    f.write_bytes(data)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a readable safetensors file"):
        load(copy)


def test_integer_weights_are_named(copy):
    f = copy / "model.safetensors"
    tensors = load_file(str(f))
    tensors["lm_head.weight"] = tensors["lm_head.weight"].to(torch.int64)
    save_file(tensors, str(f))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor lm_head\.weight has dtype I64"):
        load(copy)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_named(copy, value):
    f = copy / "model.safetensors"
    tensors = load_file(str(f))
    tensors["backbone.blocks.0.ffn.proj_down.weight"][3, 5] = value
    save_file(tensors, str(f))
    with pytest.raises(CheckpointError, match=r"NaN or inf weights \(as float32\): "
                                              r"backbone\.blocks\.0\.ffn\.proj_down\.weight in .*model\.safetensors"):
        load(copy)
    with pytest.raises(CheckpointError, match=r"proj_down"):
        load(copy, weight_mode="fused")


def test_large_finite_weights_load_and_float16_overflow_is_named(copy):
    """A float32 sum of finite weights can overflow: that alone must not count as non-finite. Converting
    to float16 can overflow for real: that must be named."""
    f = copy / "model.safetensors"
    tensors = load_file(str(f))
    tensors["lm_head.weight"][0, :2] = 3e38
    save_file(tensors, str(f))
    assert load(copy).lm_head.weight[0, 0].item() == pytest.approx(3e38)
    tensors["lm_head.weight"][0, :2] = 1e5
    save_file(tensors, str(f))
    with pytest.raises(CheckpointError, match=r"\(as float16\): lm_head\.weight"):
        load(copy, dtype=torch.float16)


def _sharded(directory, shard_name):
    """An index whose weight map sends lm_head to ``shard_name``."""
    tensors = load_file(str(directory / "model.safetensors"))
    (directory / "model.safetensors").unlink()
    head = {"lm_head.weight": tensors.pop("lm_head.weight")}
    save_file(tensors, str(directory / "rest.safetensors"))
    weight_map = {k: "rest.safetensors" for k in tensors} | {"lm_head.weight": shard_name}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return head


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "nested_dotdot", "symlink_out"])
def test_shard_paths_outside_the_directory_are_refused(copy, tmp_path, kind):
    outside = tmp_path / "outside.safetensors"
    name = {"dotdot": "../outside.safetensors", "absolute": str(outside),
            "nested_dotdot": "sub/../../outside.safetensors", "symlink_out": "head.safetensors"}[kind]
    save_file(_sharded(copy, name), str(outside))
    if kind == "symlink_out":
        (copy / "head.safetensors").symlink_to(outside)
    with pytest.raises(CheckpointError, match=r"index\.json names shard .*outside"):
        load(copy)


def test_single_file_symlinked_out_is_refused(copy, tmp_path):
    (copy / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    (copy / "model.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(CheckpointError, match="outside"):
        load(copy)


def test_hub_cache_layout_with_blob_links_loads(saved, tmp_path):
    """snapshots/<rev>/model.safetensors -> ../../blobs/<hash>, as huggingface_hub stores repos."""
    repo = tmp_path / "models--org--name"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in saved.iterdir():
        (blobs / f"h-{f.name}").write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(f"../../blobs/h-{f.name}")
    torch.testing.assert_close(_logits(load(snap)), _logits(load(saved)), rtol=0, atol=0)


@pytest.mark.parametrize("index", ["{", "[]", '{"weight_map": [1]}', '{"weight_map": {"lm_head.weight": 3}}'])
def test_malformed_index_is_named(copy, index):
    (copy / "model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json"):
        load(copy)


def test_config_type_error_names_the_file_and_field(copy):
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "num_heads": "2"}))
    with pytest.raises(ValueError, match=r"config\.json: num_heads must be a positive integer, got '2'"):
        load(copy)


@pytest.mark.parametrize("dim", [96, 160])  # 96 * 2.667 = 256.03 (ceil: 320); 160 * 2.667 = 426.7 (both 448)
def test_transformers_model_with_affected_ffn_width_loads(tmp_path, dim):
    from transformers import xLSTMConfig, xLSTMForCausalLM

    hf_cfg = xLSTMConfig(vocab_size=64, hidden_size=dim, num_hidden_layers=1, num_heads=2, ffn_proj_factor=2.667)
    torch.manual_seed(0)
    hf = xLSTMForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = load(tmp_path / "hf")
    assert ours.config.ffn_dim == hf.backbone.blocks[0].ffn.up_proj_dim
    with torch.no_grad():
        assert (_logits(ours) - hf(IDS, use_cache=False).logits).abs().max() <= 1e-4


def test_directory_saved_with_the_old_ffn_rounding_still_loads(tmp_path):
    """Before the official rule, 96 * 2.667 gave 320 (ceil); such directories load, and saved again they
    hold a factor that transformers rounds to the same width."""
    from transformers import AutoModelForCausalLM

    cfg = CFG.replace(embedding_dim=96, ffn_proj_factor=320 / 96)
    model = perturbed_model(cfg)
    assert model.config.ffn_dim == 320
    save_pretrained(model, tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    (tmp_path / "old" / "config.json").write_text(json.dumps({**config, "ffn_proj_factor": 2.667}))
    assert XLSTMConfig.from_json(tmp_path / "old" / "config.json").ffn_dim == 256
    for mode in ("single", "fused"):
        with pytest.warns(UserWarning, match="old rounding"):
            again = load(tmp_path / "old", weight_mode=mode)
        assert again.config.ffn_dim == 320
        torch.testing.assert_close(_logits(again), _logits(model), rtol=0, atol=1e-5)
    save_pretrained(again, tmp_path / "resaved")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "resaved").eval()
    with torch.no_grad():
        assert (hf(IDS, use_cache=False).logits - _logits(model)).abs().max() <= 1e-4


def test_official_out_norm_bias_is_used_with_use_bias(tmp_path):
    """The official xlstm code gives the out norm a bias when use_bias=True (transformers does not)."""
    model = perturbed_model(CFG.replace(use_bias=True))
    save_pretrained(model, tmp_path / "plain")
    tensors = load_file(str(tmp_path / "plain" / "model.safetensors"))
    bias = torch.randn(CFG.embedding_dim, generator=torch.Generator().manual_seed(5))
    save_pretrained(model, tmp_path / "official")
    save_file({**tensors, "backbone.out_norm.bias": bias}, str(tmp_path / "official" / "model.safetensors"))
    plain, official = load(tmp_path / "plain"), load(tmp_path / "official", weight_mode="fused")
    assert plain.backbone.out_norm.bias is None
    with torch.no_grad():
        diff = official.hidden_states(IDS)[0] - plain.hidden_states(IDS)[0]
    torch.testing.assert_close(diff, bias.expand_as(diff), rtol=0, atol=1e-5)
    save_pretrained(official, tmp_path / "resaved")  # kept on saving
    assert torch.equal(load_file(str(tmp_path / "resaved" / "model.safetensors"))["backbone.out_norm.bias"], bias)
    # without use_bias the tensor stays unexpected
    config = json.loads((tmp_path / "official" / "config.json").read_text())
    (tmp_path / "official" / "config.json").write_text(json.dumps({**config, "use_bias": False}))
    with pytest.raises(CheckpointError, match="unexpected tensors: .*backbone.out_norm.bias"):
        load(tmp_path / "official")


def test_saved_directory_has_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = fastxlstm.save_pretrained(perturbed_model(CFG), tmp_path / "out")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o755
    assert all(f.stat().st_mode & 0o777 == 0o644 for f in path.iterdir())
