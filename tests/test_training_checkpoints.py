"""Training checkpoints under attack and damage: DCP metadata and values that would run code are refused
without running it; truncated or altered checkpoints are skipped for the previous intact one; files
are fsynced before the rename that publishes them."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from fastxlstm.config import XLSTMConfig
from fastxlstm.model import build_model
from fastxlstm.training import checkpointing
from fastxlstm.training.checkpointing import CheckpointIntegrityError
from fastxlstm.training.distributed import setup
from fastxlstm.training.optim import build_optimizer

ENV = setup("cpu")


class _CreatesFile:
    """Unpickling it calls open(path, "w"): creates the file."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _trained(seed: int = 0):
    model = build_model(XLSTMConfig(vocab_size=40, embedding_dim=32, num_blocks=2, num_heads=2, chunk_size=8),
                        seed=seed)
    opt = build_optimizer(model, 1e-2, 0.1, (0.9, 0.95), 1e-8)
    model(torch.randint(0, 40, (2, 8)))[0].sum().backward()
    opt.step()
    opt.zero_grad()
    return model, opt


def _save(root: Path, step: int, seed: int = 0, **kw) -> tuple[Path, torch.nn.Module]:
    model, opt = _trained(seed)
    return checkpointing.save(root, step, model, opt, ENV, {"tokens": step}, **kw), model


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """Checkpoints of steps 2 and 4 (the model of step 4 returned); tests damage copies of them."""
    root = tmp_path_factory.mktemp("saved") / "ck"
    _save(root, 2, keep=3)
    return root, _save(root, 4, seed=1, keep=3)[1]


@pytest.fixture
def ckpts(saved, tmp_path) -> Path:
    shutil.copytree(saved[0], tmp_path / "ck")
    return tmp_path / "ck"


def _fresh_load(path: Path):
    model, opt = _trained(seed=123)
    return checkpointing.load(path, model, opt), model


def _rewrite_metadata(ckpt: Path, obj) -> None:
    """What an attacker does: replace .metadata and recompute the checksums (they prove nothing about intent)."""
    (ckpt / ".metadata").write_bytes(pickle.dumps(obj))
    checkpointing.write_checksums(ckpt)


def test_normal_checkpoint_loads_exactly(saved):
    path, model = saved[0] / "step-0000004", saved[1]
    state, loaded = _fresh_load(path)
    assert state["step"] == 4 and state["tokens"] == 4
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert json.loads((path / "checksums.json").read_text())["files"][".metadata"]["sha256"]


@pytest.mark.parametrize("attack", ["reduce", "nested", "build_on_class", "not_metadata", "garbage"])
def test_metadata_that_would_run_code_is_refused_unrun(ckpts, tmp_path, attack):
    path = ckpts / "step-0000002"
    marker = tmp_path / "pwned"
    metadata = checkpointing.read_metadata(path)
    if attack == "reduce":
        payload = _CreatesFile(marker)
    elif attack == "nested":  # a legitimate Metadata whose planner data hides the payload
        metadata.planner_data = {"x": _CreatesFile(marker)}
        payload = metadata
    elif attack == "build_on_class":  # set an attribute on a torch class itself (no call needed)
        payload = None
    elif attack == "not_metadata":
        payload = {"state_dict_metadata": {}}
    else:
        payload = None
    if attack == "build_on_class":
        data = pickle.dumps(metadata, protocol=2)
        # GLOBAL Metadata, then a BUILD with slot state {"__eq__": None} applied to the class
        evil = (b"\x80\x02ctorch.distributed.checkpoint.metadata\nMetadata\n"
                b"N}X\x06\x00\x00\x00__eq__Ns\x86b.")
        (path / ".metadata").write_bytes(evil)
        checkpointing.write_checksums(path)
        assert data  # the real one pickled fine
    elif attack == "garbage":
        (path / ".metadata").write_bytes(b"\x80\x04not a pickle at all")
        checkpointing.write_checksums(path)
    else:
        _rewrite_metadata(path, payload)
    with pytest.raises(CheckpointIntegrityError, match=r"refusing to load .*\.metadata"):
        _fresh_load(path)
    assert not marker.exists()
    from torch.distributed.checkpoint.metadata import Metadata

    assert "__eq__" not in Metadata.__dict__ or Metadata.__dict__["__eq__"] is not None


def test_value_that_would_run_code_is_refused_unrun(ckpts, tmp_path):
    """Non-tensor values (optimizer hyper-parameters) are torch.save'd pickles inside the .distcp files;
    DCP's planner loads them with weights_only=False. Point one at a payload."""
    path = ckpts / "step-0000002"
    marker = tmp_path / "pwned"
    metadata = checkpointing.read_metadata(path)
    buf = io.BytesIO()
    torch.save(_CreatesFile(marker), buf)
    (path / "evil.distcp").write_bytes(buf.getvalue())
    index = next(i for i in metadata.storage_data if i.fqn.endswith("param_groups.0.lr"))
    info = metadata.storage_data[index]
    info.relative_path, info.offset, info.length = "evil.distcp", 0, len(buf.getvalue())
    _rewrite_metadata(path, metadata)
    with pytest.raises(CheckpointIntegrityError, match="param_groups.0.lr"):
        _fresh_load(path)
    assert not marker.exists()


def _damage(path: Path, how: str) -> None:
    shard = next(path.glob("*.distcp"))
    data = shard.read_bytes()
    if how == "truncate":
        shard.write_bytes(data[: len(data) // 2])
    elif how == "flip":
        shard.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    elif how == "delete":
        shard.unlink()
    elif how == "state":
        (path / "trainer_state.json").write_text('{"step": ')
    elif how == "sums":
        (path / "checksums.json").write_text("[]")


@pytest.mark.parametrize("how", ["truncate", "flip", "delete", "state", "sums"])
def test_resume_falls_back_from_a_damaged_newest_checkpoint(ckpts, how):
    root = ckpts
    _damage(root / "step-0000004", how)
    with pytest.warns(UserWarning, match="step-0000004 is damaged"):
        chosen = checkpointing.find_resume_point(root, ENV)
    assert chosen == root / "step-0000002"
    assert _fresh_load(chosen)[0]["step"] == 2


def test_resume_refuses_when_every_checkpoint_is_damaged(ckpts):
    root = ckpts
    _damage(root / "step-0000002", "truncate")
    _damage(root / "step-0000004", "flip")
    with pytest.warns(UserWarning), pytest.raises(CheckpointIntegrityError, match="no intact checkpoint"):
        checkpointing.find_resume_point(root, ENV)


def test_sizes_only_checksums_still_catch_truncation(tmp_path):
    root = tmp_path / "ck"
    path, _ = _save(root, 2, checksums=False)
    assert "sha256" not in json.loads((path / "checksums.json").read_text())["files"][".metadata"]
    assert checkpointing.verify(path) is None
    _damage(path, "truncate")
    assert "bytes" in checkpointing.verify(path)


def test_checkpoint_without_checksums_still_resumes(ckpts):
    """Checkpoints written before checksums existed load as before."""
    path = ckpts / "step-0000004"
    (path / "checksums.json").unlink()
    assert checkpointing.find_resume_point(ckpts, ENV) == path
    assert _fresh_load(path)[0]["step"] == 4


def test_every_file_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path, _ = _save(tmp_path / "ck", 2)
    tmp = str(tmp_path / "ck" / ".step-0000002.tmp")
    rename = events.index(("replace", tmp))
    synced = {Path(p).name for kind, p in events[:rename] if kind == "fsync" and p.startswith(tmp)}
    assert synced >= {p.name for p in path.iterdir()} | {".step-0000002.tmp"}
    latest = events.index(("replace", str(tmp_path / "ck" / ".latest.tmp")))
    assert ("fsync", str(tmp_path / "ck" / ".latest.tmp")) in events[rename:latest]
