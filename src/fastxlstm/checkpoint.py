"""Checkpoint I/O in the HF layout of ``NX-AI/xLSTM-7b``: config.json + (sharded) safetensors.

Loading is here; writing (:func:`save_pretrained`, re-exported here) is :mod:`fastxlstm.model.hf_layout`,
below the model, so that ``model.save_pretrained(dir)`` needs nothing above it. Loading builds the model on
the meta device and assigns memory-mapped tensors, so no random weights are materialised first. ``single``
checkpoints load into ``fused`` models (q|k|v|o, i|f and gate|up concatenated) and back. Mismatches between
a checkpoint and its config are reported by tensor name. No pickle anywhere.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from .config import XLSTMConfig
from .devices import default_dtype, parse_dtype, resolve_device
from .model import XLSTMForCausalLM, build_model
from .model.hf_layout import CONFIG_NAME, FUSED_PARTS, INDEX_NAME, WEIGHTS_NAME, keeps_dtype, save_pretrained
from .model.quant import CONFIG_KEY as QUANT_KEY
from .model.quant import quantize_model, quantizing_transform, saved_quantization
from .ops.quant import check_supported, parse_quantization

_OUT_NORM_BIAS = "backbone.out_norm.bias"


class CheckpointError(ValueError):
    """A checkpoint does not match its config (names the offending tensors)."""


# ----------------------------------------------------------------------------- resolve
def resolve_model_dir(path_or_repo_id: str | os.PathLike) -> Path:
    """A local directory, or a hub repo id fetched with huggingface_hub (honours HF_HUB_OFFLINE and the cache)."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{path} is a file; expected a model directory containing {CONFIG_NAME}")
    text = str(path_or_repo_id)
    # a hub id is "org/name"; anything else, or an "org/name" whose "org" is a local directory, is a local path
    looks_local = text.startswith((".", "/", "~")) or text.count("/") != 1 or path.parent.is_dir()
    if looks_local:
        raise FileNotFoundError(f"model directory {text!r} does not exist")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(text, allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
    except HFValidationError as e:
        raise FileNotFoundError(f"{text!r} is neither a local directory nor a valid hub repo id") from e
    except Exception as e:  # network errors, offline mode without cache, gated repos
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise FileNotFoundError(
            f"{text!r} is not a local directory, and fetching it from the hub failed ({type(e).__name__}: {first}); "
            "pass an existing local directory or populate the HF cache"
        ) from e


def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index} is not a safetensors index ({type(e).__name__}: {e})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) and v for v in weight_map.values()):
        raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names")
    return weight_map


def _inside(model_dir: Path, name: str, source: Path) -> Path:
    """``model_dir / name``, refused when ``name`` is absolute, climbs with ``..``, or resolves (through
    symlinks) outside the model directory. In a hub cache snapshot, links into the repo's ``blobs/``
    are what the cache is made of and are allowed."""
    parts = Path(name).parts
    if Path(name).is_absolute() or ".." in parts or "\\" in name:
        raise CheckpointError(f"{source} names shard {name!r}, which is outside {model_dir}")
    path = model_dir / name
    root = model_dir.resolve()
    roots = [root, root.parent.parent] if root.parent.name == "snapshots" else [root]
    if path.exists() and not any(path.resolve().is_relative_to(r) for r in roots):
        raise CheckpointError(f"{source} names shard {name!r}, a link to {path.resolve()} outside {model_dir}")
    return path


def _shard_files(model_dir: Path) -> list[Path]:
    index = model_dir / INDEX_NAME
    if index.exists():
        files = sorted({_inside(model_dir, f, index) for f in _weight_map(index).values()})
    elif (model_dir / WEIGHTS_NAME).exists():
        files = [_inside(model_dir, WEIGHTS_NAME, model_dir)]
    else:
        files = [_inside(model_dir, f.name, model_dir) for f in sorted(model_dir.glob("*.safetensors"))]
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {model_dir} (expected {WEIGHTS_NAME} or {INDEX_NAME})")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{INDEX_NAME} names shard(s) that do not exist: {', '.join(missing)}")
    return files


_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_QUANT_DTYPES = ("I8", "F8_E4M3")  # the quantized weights of a directory with a quantization_config


@dataclass
class _Shards:
    """The open safetensors files of a checkpoint: which file holds each tensor, and its shape."""

    files: list[Path]
    handles: list
    where: dict[str, int]
    shapes: dict[str, list[int]]

    @classmethod
    def open(cls, model_dir: Path, quantized: bool = False) -> _Shards:
        files = _shard_files(model_dir)
        allowed = _FLOAT_DTYPES + (_QUANT_DTYPES if quantized else ())
        handles, where, shapes = [], {}, {}
        for idx, f in enumerate(files):
            try:
                h = safe_open(str(f), framework="pt", device="cpu")
                for key in h.keys():
                    piece = h.get_slice(key)
                    if piece.get_dtype() not in allowed:
                        raise CheckpointError(f"{f}: tensor {key} has dtype {piece.get_dtype()}; weights are "
                                              f"floating point ({', '.join(_FLOAT_DTYPES)})" + (
                                                  "" if quantized else " (int8 / FP8 ones need a quantization_config "
                                                  "in config.json)"))
                    where[key], shapes[key] = idx, list(piece.get_shape())
            except CheckpointError:
                raise
            except Exception as e:  # safetensors' SafetensorError: truncated, header length lies, bad JSON
                raise CheckpointError(f"{f} is not a readable safetensors file: {e}") from None
            handles.append(h)
        return cls(files, handles, where, shapes)

    def file_of(self, key: str) -> Path:
        return self.files[self.where[key]]


def _legacy_ffn_width(config: XLSTMConfig) -> int:
    """The FFN width fastxlstm wrote before it used the official rounding: ``ceil(x / 64) * 64``."""
    m = config.ffn_round_up_to_multiple_of
    return int(math.ceil(config.embedding_dim * config.ffn_proj_factor / m) * m)


def _match_checkpoint(config: XLSTMConfig, shapes: dict[str, list[int]]) -> XLSTMConfig:
    """The config, with the FFN width of a directory fastxlstm saved with the old ``ceil`` rounding
    (read as ``ffn_proj_factor = width / embedding_dim``, which every reader rounds to that width)."""
    for key, parts in (("backbone.blocks.0.ffn.proj_up.weight", 1), ("backbone.blocks.0.ffn.proj_up_gate_z.weight", 2)):
        if key in shapes:
            width = shapes[key][0] // parts
            if width != config.ffn_dim and width == _legacy_ffn_width(config):
                warnings.warn(f"FFN width {width} is that of fastxlstm's old rounding (the official rule gives "
                              f"{config.ffn_dim}); loading with ffn_proj_factor={width / config.embedding_dim}; "
                              "save the model again to write that into its config.json", stacklevel=3)
                return config.replace(ffn_proj_factor=width / config.embedding_dim)
    return config


# ------------------------------------------------------------------------ name mapping
@dataclass(frozen=True)
class _Source:
    """Where a model parameter comes from: checkpoint tensors concatenated along dim 0, or
    (``rows`` set) rows ``start:stop`` of one fused checkpoint tensor."""

    keys: tuple[str, ...]
    rows: tuple[int, int] | None = None
    fused_rows: int = 0  # with ``rows``: the fused tensor's total rows


def _plan(model_shapes: dict[str, torch.Size], ckpt: set[str]) -> dict[str, _Source]:
    """For each model parameter, the checkpoint tensors that build it (handles single <-> fused)."""
    plan: dict[str, _Source] = {}
    for name, shape in model_shapes.items():
        source = _Source((name,))
        base, _, leaf = name.rpartition(".")
        if name not in ckpt:
            for fused, parts in FUSED_PARTS.items():
                if base.endswith(fused):  # model fused, checkpoint single
                    prefix = base[: -len(fused)]
                    source = _Source(tuple(f"{prefix}{p}.{leaf}" for p in parts))
                    break
                part = next((p for p in parts if base.endswith(p)), None)
                fused_key = f"{base[: -len(part)]}{fused}.{leaf}" if part else None
                if fused_key in ckpt:  # model single, checkpoint fused: the rows of this part
                    prefix = base[: -len(part)]
                    sizes = [model_shapes[f"{prefix}{p}.{leaf}"][0] for p in parts]
                    start = sum(sizes[: parts.index(part)])
                    source = _Source((fused_key,), (start, start + shape[0]), sum(sizes))
                    break
        plan[name] = source
    return plan


def _expected_checkpoint_shape(source: _Source, want: list[int], ckpt_shapes: dict[str, list[int]]) -> list[int]:
    """The shape the checkpoint must hold for ``source`` to build a parameter of shape ``want``."""
    if source.rows is not None:
        return [source.fused_rows, *want[1:]]
    if len(source.keys) == 1:
        return want
    # concatenation: every piece has the model's trailing dims, and the rows add up
    return [sum(ckpt_shapes[k][0] for k in source.keys), *want[1:]]


def load_state_dict(
    model_dir: Path, model_shapes: dict[str, torch.Size], dtype: torch.dtype, device: torch.device | str,
    progress: bool | None = None, shards: _Shards | None = None, keep_dtype: dict[str, torch.dtype] | None = None,
    transform: Callable[[str, torch.Tensor], dict[str, torch.Tensor]] | None = None,
    deltas: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Read and convert the checkpoint tensors the model needs, validating names and shapes first and
    finiteness after conversion (NaN or inf is an error naming the tensor and its file).

    Tensors named in ``keep_dtype`` (quantized weights, their scales) are not converted: the checkpoint
    must hold them in the dtype given there. ``transform(name, tensor)`` (load-time quantization) maps
    each converted tensor to the entries it becomes, one tensor at a time. ``deltas`` (checkpoint name ->
    float32 tensor, e.g. a LoRA adapter's ``scaling * B @ A``) are added to those checkpoint tensors in
    float32 before the conversion (and before ``transform``)."""
    keep_dtype = keep_dtype or {}
    deltas = deltas or {}
    checked: dict[str, torch.Tensor] = {}
    shards = shards or _Shards.open(model_dir)
    handles, where, ckpt_shapes = shards.handles, shards.where, shards.shapes
    plan = _plan(model_shapes, set(where))
    used = {k for source in plan.values() for k in source.keys}
    missing = sorted(k for k in used if k not in where)
    unexpected = sorted(set(where) - used)
    wrong: list[str] = []
    for name, source in plan.items():
        if any(k not in where for k in source.keys):
            continue
        want = list(model_shapes[name])
        expected = _expected_checkpoint_shape(source, want, ckpt_shapes)
        got = [sum(ckpt_shapes[k][0] for k in source.keys), *ckpt_shapes[source.keys[0]][1:]]
        if any(ckpt_shapes[k][1:] != ckpt_shapes[source.keys[0]][1:] for k in source.keys) or got != expected:
            shapes = " + ".join(str(ckpt_shapes[k]) for k in source.keys)
            wrong.append(f"{'+'.join(source.keys)}: checkpoint {shapes} vs model {expected}")
    for key, d in deltas.items():
        if key not in where:
            missing.append(f"{key} (named by the adapter)")
        elif list(d.shape) != ckpt_shapes[key]:
            wrong.append(f"{key}: checkpoint {ckpt_shapes[key]} vs adapter {list(d.shape)}")
    if missing or unexpected or wrong:
        lines = [f"checkpoint in {model_dir} does not match its config:"]
        for title, items in (("missing tensors", missing), ("unexpected tensors", unexpected),
                             ("wrong shapes", wrong)):
            if items:
                shown = ", ".join(items[:12]) + (f", ... ({len(items)} in all)" if len(items) > 12 else "")
                lines.append(f"  {title}: {shown}")
        raise CheckpointError("\n".join(lines))

    total = sum(torch.Size(s).numel() for s in ckpt_shapes.values())
    show = progress if progress is not None else total > 200_000_000
    def read(key: str) -> torch.Tensor:
        t = handles[where[key]].get_tensor(key)
        return t.float() + deltas[key] if key in deltas else t

    out: dict[str, torch.Tensor] = {}
    for name, source in tqdm(plan.items(), desc="loading weights", unit="tensor", disable=not show):
        if source.rows is not None:  # read only this part's rows of the fused tensor
            key = source.keys[0]
            t = handles[where[key]].get_slice(key)[source.rows[0]:source.rows[1]]
            if key in deltas:
                t = t.float() + deltas[key][source.rows[0]:source.rows[1]]
        elif len(source.keys) > 1:
            t = torch.cat([read(k) for k in source.keys], dim=0)
        else:
            t = read(source.keys[0])
        if name in keep_dtype:
            if any(k in deltas for k in source.keys):
                raise CheckpointError(f"{'+'.join(source.keys)} in {shards.file_of(source.keys[0])} is saved "
                                      "quantized: an adapter can only be merged into an unquantized base")
            if t.dtype != keep_dtype[name]:
                raise CheckpointError(f"{'+'.join(source.keys)} in {shards.file_of(source.keys[0])} is {t.dtype}; "
                                      f"its config.json's quantization_config needs {keep_dtype[name]}")
            out[name] = t.to(device=device)
        elif transform is not None:
            t = t.to(device=device, dtype=dtype)
            parts = transform(name, t)
            out.update(parts)
            checked[name] = parts.get(f"{name}_scale", t)  # a row's scale is NaN / inf where the row is
        else:
            out[name] = t.to(device=device, dtype=dtype)
    _check_finite(out if transform is None else checked, plan, shards, dtype)
    return out


def _check_finite(tensors: dict[str, torch.Tensor], plan: dict[str, _Source], shards: _Shards,
                  dtype: torch.dtype) -> None:
    """NaN/inf weights are an error. Cheap: one float32 sum per tensor (NaN and inf survive a sum) and
    one device sync; only a non-finite sum is confirmed element-wise (a sum can overflow)."""
    names = list(tensors)
    if not names:
        return
    def wide(t: torch.Tensor) -> torch.Tensor:  # FP8 has no sum or isfinite kernels
        return t.float() if t.dtype == torch.float8_e4m3fn else t

    sums = torch.stack([wide(tensors[n]).sum(dtype=torch.float32) for n in names])
    suspects = [n for n, ok in zip(names, torch.isfinite(sums).tolist()) if not ok]
    bad = [n for n in suspects if not torch.isfinite(wide(tensors[n])).all()]
    if bad:
        where = ", ".join(f"{'+'.join(plan[n].keys)} in {shards.file_of(plan[n].keys[0])}" for n in bad[:8])
        more = f" ({len(bad)} tensors in all)" if len(bad) > 8 else ""
        raise CheckpointError(f"NaN or inf weights (as {str(dtype).removeprefix('torch.')}): {where}{more}")


# ------------------------------------------------------------------------------ public
def load(
    path_or_repo_id: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
    weight_mode: str | None = None, progress: bool | None = None, quantization: str | None = None,
    quantize_lm_head: bool = False, adapter: str | os.PathLike | None = None,
) -> XLSTMForCausalLM:
    """Load a model from a directory in the HF layout or a hub repo id.

    ``weight_mode`` overrides the config's (``"fused"`` is what inference wants). ``adapter`` is a
    PEFT LoRA directory (``adapter_config.json`` + ``adapter_model.safetensors``): its update is
    merged into the weights as they are read (``W + scaling * B @ A`` in float32, then ``dtype``; with
    ``quantization`` the merged weight is quantized), so the model runs at the base model's speed and
    equals base + adapter up to the rounding to ``dtype``.
    A spec ``random:<preset>`` builds a randomly initialised preset (for benchmarks).
    ``quantization`` (``"int8"`` / ``"fp8"``, :mod:`fastxlstm.model.quant`) quantizes the blocks'
    projections (and the LM head with ``quantize_lm_head``) while loading, one tensor at a time, so the
    unquantized model is never held whole. A directory saved quantized loads
    as saved (its ``quantization_config``), without unquantized weights; ``quantization`` may then only
    repeat its scheme.
    """
    if quantization is not None:
        check_supported(quantization, device)
    spec = str(path_or_repo_id)
    if spec.startswith("random:"):
        from .config import preset

        if adapter is not None:
            raise ValueError("an adapter needs the base model it was trained on, not a random:<preset> model")
        cfg = preset(spec.split(":", 1)[1])
        if weight_mode:
            cfg = cfg.replace(weight_mode=weight_mode)
        model = build_model(cfg, device=device, dtype=dtype).eval()
        return quantize_model(model, quantization, quantize_lm_head) if quantization else model
    model_dir = resolve_model_dir(path_or_repo_id)
    config_path = model_dir / CONFIG_NAME
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} not found: not a model directory")
    config = XLSTMConfig.from_json(config_path)
    if weight_mode is not None:
        config = config.replace(weight_mode=weight_mode)
    saved = saved_quantization(config, quantization, device, str(config_path))
    if saved is not None:
        config = config.replace(extra={k: v for k, v in config.extra.items() if k != QUANT_KEY})
    shards = _Shards.open(model_dir, quantized=saved is not None)
    config = _match_checkpoint(config, shards.shapes)
    with torch.device("meta"):
        model = XLSTMForCausalLM(config)
        if config.use_bias and config.add_out_norm and _OUT_NORM_BIAS in shards.shapes:
            # the official xlstm code gives the out norm a bias with use_bias (transformers does not)
            model.backbone.out_norm.bias = torch.nn.Parameter(torch.zeros(config.embedding_dim))
    shapes = {k: v.shape for k, v in model.state_dict().items()}  # what the checkpoint holds, unquantized
    transform = None
    if saved is not None:  # the checkpoint holds the quantized weights and their scales
        model = quantize_model(model, *saved)
        shapes = {k: v.shape for k, v in model.state_dict().items()}
    elif quantization is not None:  # load-time quantization of each weight
        transform = quantizing_transform(quantize_model(model, quantization, quantize_lm_head), quantization)
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    keep = {k: v.dtype for k, v in model.state_dict().items() if saved is not None and keeps_dtype(k, v)}
    deltas = None
    if adapter is not None:
        from .model.lora import adapter_deltas

        deltas = adapter_deltas(adapter)
    state = load_state_dict(model_dir, shapes, dtype, device, progress, shards, keep_dtype=keep, transform=transform,
                            deltas=deltas)
    model.load_state_dict(state, strict=not config.tie_word_embeddings, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.backbone.embeddings.weight
    model.source_dir = model_dir  # type: ignore[attr-defined]
    model.adapter_dir = Path(adapter) if adapter is not None else None  # type: ignore[attr-defined]
    return model.eval()




def load_model_and_tokenizer(
    path_or_repo_id: str | os.PathLike, device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None, weight_mode: str | None = None, quantization: str | None = None,
    adapter: str | os.PathLike | None = None,
):
    """Model (with ``adapter`` merged, see :func:`load`) plus its tokenizer (a byte-level one for
    ``random:<preset>`` specs). ``device`` None: CUDA when available; ``dtype`` None / ``"auto"``: bfloat16 on
    CUDA, float32 on the CPU (:mod:`fastxlstm.devices`)."""
    from .tokenizer import Tokenizer

    device = resolve_device(device)
    dtype = parse_dtype(dtype) or default_dtype(device)
    quantization = parse_quantization(quantization)
    model = load(path_or_repo_id, device=device, dtype=dtype, weight_mode=weight_mode, quantization=quantization,
                 adapter=adapter)
    if str(path_or_repo_id).startswith("random:"):
        tokenizer = Tokenizer.byte_level()
    else:
        tokenizer = Tokenizer.from_dir(model.source_dir)  # type: ignore[attr-defined]
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {model.config.vocab_size}"
        )
    return model, tokenizer


__all__ = ["CheckpointError", "load", "load_state_dict", "load_model_and_tokenizer", "resolve_model_dir",
           "save_pretrained", "CONFIG_NAME", "WEIGHTS_NAME", "INDEX_NAME"]
