"""The checkpoint layout of ``NX-AI/xLSTM-7b`` (config.json + safetensors, sharded with an index), and writing
it: :func:`save_pretrained`, which ``XLSTMForCausalLM.save_pretrained`` calls.

Writing lives with the model, below :mod:`fastxlstm.checkpoint` (which loads: it builds models, so it sits on
top of this package and re-exports :func:`save_pretrained`). The file names and the fused <-> single parameter
map here are what both directions use. No pickle anywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..ops.quant import STORAGE

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

#: fused parameter suffix -> the single-mode parameter suffixes concatenated along dim 0.
FUSED_PARTS = {
    "mlstm_layer.qkv_opreact": ("mlstm_layer.q", "mlstm_layer.k", "mlstm_layer.v", "mlstm_layer.ogate_preact"),
    "mlstm_layer.ifgate_preact": ("mlstm_layer.igate_preact", "mlstm_layer.fgate_preact"),
    "ffn.proj_up_gate_z": ("ffn.proj_up_gate", "ffn.proj_up"),
}


def keeps_dtype(name: str, tensor: torch.Tensor) -> bool:
    """True for the state-dict entries a dtype conversion must leave alone: quantized weights and
    their float32 scales (:mod:`fastxlstm.model.quant`)."""
    return tensor.dtype in STORAGE.values() or name.endswith(".weight_scale")


def single_mode_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of an ``XLSTMForCausalLM`` in ``single`` layout (fused matrices split), which every
    loader reads."""
    out: dict[str, torch.Tensor] = {}
    cfg = model.config
    sizes = {
        "mlstm_layer.qkv_opreact": [cfg.qk_dim, cfg.qk_dim, cfg.v_dim, cfg.v_dim],
        "mlstm_layer.ifgate_preact": [cfg.num_heads, cfg.num_heads],
        "ffn.proj_up_gate_z": [cfg.ffn_dim, cfg.ffn_dim],
    }
    for name, t in model.state_dict().items():
        base, _, leaf = name.rpartition(".")
        fused = next((fz for fz in FUSED_PARTS if base.endswith(fz)), None)
        if fused is None:
            out[name] = t
            continue
        prefix = base[: -len(fused)]
        for part, piece in zip(FUSED_PARTS[fused], t.split(sizes[fused], dim=0)):
            out[f"{prefix}{part}.{leaf}"] = piece
    return out


def _umask() -> int:
    try:  # Linux: read it without changing it
        with open("/proc/self/status") as fh:
            return int(next(line.split()[1] for line in fh if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """``safetensors.torch.save_file`` with the permissions ``open()`` gives a new file (save_file leaves 0600)."""
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())


def atomic_replace_dir(tmp: Path, target: Path) -> None:
    """Put the finished directory ``tmp`` at ``target`` (the old one, if any, is removed only after the swap)."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old)
    else:
        tmp.rename(target)


@contextmanager
def staged_dir(directory: str | os.PathLike) -> Iterator[Path]:
    """A new temporary directory next to ``directory`` to write it in whole: when the block ends it takes
    ``directory``'s place (:func:`atomic_replace_dir`), so a crash never leaves a half-written one; on an error
    it is removed. Made with os.mkdir, not tempfile.mkdtemp: it gets the umask's permissions (mkdtemp: 0700)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        atomic_replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_tokenizer_files(tokenizer_dir: str | os.PathLike | None, dest: Path) -> None:
    """Copy those of :data:`TOKENIZER_FILES` that ``tokenizer_dir`` holds into ``dest`` (None: nothing)."""
    if tokenizer_dir is None:
        return
    for fname in TOKENIZER_FILES:
        src = Path(tokenizer_dir) / fname
        if src.exists():
            shutil.copy2(src, dest / fname)


def save_pretrained(
    model: nn.Module, directory: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None,
    max_shard_bytes: int = 5 * 1024**3, dtype: torch.dtype | None = None,
) -> Path:
    """Write an ``XLSTMForCausalLM``'s config.json + safetensors (sharded with an index past
    ``max_shard_bytes``) in the ``single`` layout that transformers' ``xLSTMForCausalLM`` loads (a quantized
    model: its int8 / FP8 weights and float32 scales as they are, ``dtype`` converting the rest). Written to a temporary
    directory first and renamed into place, so a crash never leaves a half-written model."""
    directory = Path(directory)
    state = single_mode_state(model)
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    state = {k: (v.to(dtype) if dtype and not keeps_dtype(k, v) else v).detach().to("cpu").contiguous()
             for k, v in state.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    with staged_dir(directory) as tmp:
        config = model.config.replace(weight_mode="single")
        config.to_json(tmp / CONFIG_NAME)
        if len(shards) == 1:
            save_safetensors(shards[0], tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        else:
            weight_map = {}
            for idx, shard in enumerate(shards, 1):
                fname = f"model-{idx:05d}-of-{len(shards):05d}.safetensors"
                save_safetensors(shard, tmp / fname, metadata={"format": "pt"})
                weight_map.update({k: fname for k in shard})
            total = sum(t.numel() * t.element_size() for t in state.values())
            (tmp / INDEX_NAME).write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
            )
        copy_tokenizer_files(tokenizer_dir, tmp)
    return directory

