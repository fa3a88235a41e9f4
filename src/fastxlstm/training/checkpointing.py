"""Training checkpoints with ``torch.distributed.checkpoint`` (sharded, one file per rank), atomic,
checksummed, loaded without running code.

Each checkpoint is written into ``<dir>/.step-NNNNNNN.tmp``; rank 0 then writes the trainer state
and ``checksums.json`` (size and SHA-256 of every file), fsyncs every file and the directory, and
renames it to ``<dir>/step-NNNNNNN``; then ``<dir>/latest`` is replaced atomically. A kill at any
moment leaves either the previous complete checkpoint or the new one. Resume takes the newest
checkpoint whose files match their checksums and falls back, with a warning, to older ones when
files were truncated or changed afterwards (a full disk, a bad copy).

What is trusted: nothing in a checkpoint directory runs code when it is loaded. DCP stores its
``.metadata`` as a pickle; it is read with an unpickler that builds only the classes DCP's
metadata consists of (torch 2.4 to 2.13: ``torch.distributed.checkpoint.metadata``'s dataclasses,
``filesystem._StorageInfo``, ``torch.Size``, dtypes, layouts, paths) and refuses anything else.
Tensors are read with ``torch.load(weights_only=True)`` (DCP's own reader) and non-tensor values
(optimizer hyper-parameters) with ``weights_only=True`` too (DCP's default planner uses
``weights_only=False`` there). The checksums detect corruption, not tampering: whoever can write
the directory can rewrite them; tampering is what the restricted loading is for.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from .distributed import DistEnv, barrier, broadcast_object

_STEP_RE = re.compile(r"^step-(\d{7})$")
STATE_FILE = "trainer_state.json"
CHECKSUMS_FILE = "checksums.json"
METADATA_FILE = ".metadata"
_HASH_BLOCK = 8 << 20


class CheckpointIntegrityError(RuntimeError):
    """A training checkpoint is corrupt, or holds something a DCP checkpoint never contains."""


# --------------------------------------------------------------------------- safe DCP load
_DCP_MD = "torch.distributed.checkpoint.metadata"
# Every global a DCP ``.metadata`` pickle names (checked against the sources of torch 2.11 and 2.13:
# metadata.py and filesystem.py pickle the same classes; torch.layout pickles as _get_layout(name)).
_METADATA_GLOBALS = frozenset({
    *((_DCP_MD, name) for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata",
                                   "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
                                   "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    *((mod, cls) for mod in ("pathlib", "pathlib._local") for cls in ("PosixPath", "WindowsPath")),
})


class _MetadataUnpickler(pickle._Unpickler):  # the Python unpickler: its BUILD step can be checked
    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str) -> Any:
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) not in _METADATA_GLOBALS and not is_dtype:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which DCP metadata never contains")
        return super().find_class(module, name)

    def _load_build(self) -> None:
        if isinstance(self.stack[-2], type):  # BUILD on a class would set attributes of the class itself
            raise pickle.UnpicklingError("it sets attributes of a class")
        pickle._Unpickler.load_build(self)

    dispatch[pickle.BUILD[0]] = _load_build


def read_metadata(path: Path) -> Metadata:
    """DCP's ``.metadata`` of checkpoint ``path``, unpickled with only DCP's own classes allowed."""
    file = Path(path) / METADATA_FILE
    try:
        with file.open("rb") as fh:
            metadata = _MetadataUnpickler(fh).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise CheckpointIntegrityError(f"refusing to load {file}: {e} (not a torch.distributed.checkpoint "
                                       "metadata file, or altered after it was written)") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointIntegrityError(f"refusing to load {file}: it holds a {type(metadata).__name__}, "
                                       "not DCP Metadata")
    return metadata


class _SafeReader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:
            raise CheckpointIntegrityError("per-rank DCP metadata files are not used by this trainer")
        metadata = read_metadata(Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafeLoadPlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        """DCP's planner unpickles non-tensor values with weights_only=False; restrict it, then hand
        the (re-serialised) value to it."""
        try:
            obj = torch.load(value, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
            raise CheckpointIntegrityError(f"refusing to load value {read_item.dest_index.fqn!r}: {e}") from None
        buf = io.BytesIO()
        torch.save(obj, buf)
        buf.seek(0)
        super().load_bytes(read_item, buf)


# ------------------------------------------------------------------------- listing, checks
# Frozen parameters (a LoRA run's base weights) are not saved: they come from the config (model.init_from or the
# seeded preset) on resume. Loading is not strict because of them; every other missing key is an error.
STATE_OPTIONS = StateDictOptions(ignore_frozen_params=True)
LOAD_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:07d}"


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Finished checkpoints (those with their trainer state written), oldest first."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and (p / STATE_FILE).exists() and (p / METADATA_FILE).exists():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    ckpts = complete_checkpoints(root)
    return ckpts[-1][1] if ckpts else None


def _digest(path: Path, sync: bool = False) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(_HASH_BLOCK):
            h.update(block)
        if sync:
            os.fsync(fh.fileno())
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checksums(directory: Path, digests: bool = True) -> None:
    """``checksums.json`` for every file of ``directory`` (size, and SHA-256 with ``digests``),
    every file fsynced."""
    files = {}
    for p in sorted(directory.iterdir()):
        if p.is_file() and p.name != CHECKSUMS_FILE:
            entry: dict[str, Any] = {"size": p.stat().st_size}
            if digests:
                entry["sha256"] = _digest(p, sync=True)
            else:
                with p.open("rb") as fh:
                    os.fsync(fh.fileno())
            files[p.name] = entry
    _write_synced(directory / CHECKSUMS_FILE, json.dumps({"files": files}, indent=1) + "\n")


def _write_synced(path: Path, text: str) -> None:
    with path.open("w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def verify(path: Path) -> str | None:
    """What is wrong with checkpoint ``path`` (missing, truncated or changed files), or None. A
    checkpoint written before checksums existed is accepted when its trainer state reads."""
    path = Path(path)
    try:
        json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        return f"{STATE_FILE} does not read ({e})"
    sums = path / CHECKSUMS_FILE
    if not sums.exists():
        return None
    try:
        files = json.loads(sums.read_text())["files"]
        entries = [(str(name), int(e["size"]), e.get("sha256")) for name, e in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{CHECKSUMS_FILE} does not read ({e})"
    for name, size, sha in entries:
        file = path / name
        if Path(name).name != name or not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} were written"
        if sha is not None and _digest(file) != sha:
            return f"{name} does not match its SHA-256"
    return None


# ---------------------------------------------------------------------------- save, load
def save(root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv,
         trainer_state: dict[str, Any], keep: int = 2, checksums: bool = True) -> Path:
    """Collective: every rank must call it. ``checksums=False`` records file sizes only (no hashing)."""
    root = Path(root)
    final = step_dir(root, step)
    tmp = root / f".{final.name}.tmp"
    if env.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer, options=STATE_OPTIONS)
    with warnings.catch_warnings():  # single process: no process group is expected
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    barrier()
    if env.is_main:
        _write_synced(tmp / STATE_FILE, json.dumps({"step": step, **trainer_state}, indent=2) + "\n")
        write_checksums(tmp, digests=checksums)
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest_tmp = root / ".latest.tmp"
        _write_synced(latest_tmp, final.name + "\n")
        os.replace(latest_tmp, root / "latest")
        _fsync_dir(root)
        for _, old in complete_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model and optimizer state in place (collective); returns the trainer state."""
    read_metadata(path)  # refuses a hostile .metadata with its own error (inside dcp.load it is wrapped)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=STATE_OPTIONS)
    state = {"model": model_sd, "optim": optim_sd}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=_SafeReader(str(path)), planner=_SafeLoadPlanner())
    except CheckpointException as e:
        ours = [exc for exc, _ in e.failures.values() if isinstance(exc, CheckpointIntegrityError)]
        if ours:
            raise ours[0] from None
        raise
    result = set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                            options=LOAD_OPTIONS)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    wrong = sorted(set(getattr(result, "missing_keys", [])) - frozen) + sorted(getattr(result, "unexpected_keys", []))
    if wrong:
        raise CheckpointIntegrityError(f"checkpoint {path} does not match the model: {', '.join(wrong[:8])}")
    return json.loads((Path(path) / STATE_FILE).read_text())


def find_resume_point(root: Path, env: DistEnv) -> Path | None:
    """Rank 0 picks the newest complete checkpoint that passes :func:`verify` (warning about each newer
    one it skips); all ranks agree on it. Raises when checkpoints exist but none is intact."""
    choice: tuple[str, str] | None = None
    if env.is_main:
        skipped = []
        for _, path in reversed(complete_checkpoints(Path(root))):
            problem = verify(path)
            if problem is None:
                choice = (str(path), "")
                break
            skipped.append(f"{path.name}: {problem}")
            warnings.warn(f"checkpoint {path} is damaged ({problem}); trying an older one", stacklevel=2)
        if choice is None:
            choice = ("", "; ".join(skipped))
    path, error = broadcast_object(choice)
    if error:
        raise CheckpointIntegrityError(f"no intact checkpoint in {root} ({error}); move the damaged ones away "
                                       "or set checkpoint.resume=false to start over")
    return Path(path) if path else None
