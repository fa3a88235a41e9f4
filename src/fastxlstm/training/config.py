"""Training configuration: nested dataclasses read from YAML, with ``section.key=value`` overrides."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..model.lora import DEFAULT_TARGETS


@dataclass
class LoRASection:
    r: int = 0  # 0: train every parameter; > 0: LoRA of this rank on the frozen base (fastxlstm.model.lora)
    alpha: float = 16.0  # scaling = alpha / r (alpha / sqrt(r) with use_rslora)
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))  # projection names
    use_rslora: bool = False


@dataclass
class ModelSection:
    arch: str = "xlstm"  # xlstm | llama (the ablation baseline, sized to match the xLSTM config)
    preset: str | None = "xlstm-tiny"  # XLSTMConfig preset; null = XLSTMConfig defaults (+ overrides)
    overrides: dict[str, Any] = field(default_factory=dict)  # XLSTMConfig fields, e.g. vocab_size
    init_from: str | None = None  # HF-layout directory to fine-tune from (e.g. the 7B)
    backend: str = "auto"  # mLSTM ops: auto (Triton on GPU), reference, triton
    lora: LoRASection = field(default_factory=LoRASection)


@dataclass
class DataSection:
    path: str = ""  # a directory written by `fastxlstm data prepare`
    seq_len: int = 256
    train_split: str = "train"
    val_split: str = "val"


@dataclass
class OptimSection:
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | wsd | linear | constant
    decay_fraction: float = 0.2  # wsd: share of steps spent cooling down
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass
class TrainSection:
    steps: int = 1000
    micro_batch_size: int = 8
    grad_accum: int = 1
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    compile: bool = False
    activation_checkpointing: bool = False
    debug_kill_at_step: int | None = None  # fault injection for tests: SIGKILL self after this step


@dataclass
class EvalSection:
    every: int = 200
    tokens: int = 65536
    batch_size: int = 8
    keep_best: bool = False  # also export the weights of the lowest held-out loss to <out_dir>/best


@dataclass
class LogSection:
    every: int = 10
    tensorboard: bool = False
    progress: bool = True
    peak_tflops: float | None = None  # for MFU; detected for known GPUs when unset


@dataclass
class CheckpointSection:
    every: int = 500
    keep: int = 2
    resume: bool = True
    checksums: bool = True  # SHA-256 of every file (rank 0 reads it all back: ~1 s/GB); false: sizes only


@dataclass
class ExportSection:
    enabled: bool = True
    dtype: str = "float32"  # float32 | bfloat16 | float16 (or bf16, half, fp32: fastxlstm.devices.parse_dtype)
    dir: str | None = None  # default: <out_dir>/final (LoRA runs: the adapter, default <out_dir>/adapter)
    merged: bool = False  # LoRA runs: also write base + adapter merged, as an HF directory, to <out_dir>/final


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    log: LogSection = field(default_factory=LogSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    export: ExportSection = field(default_factory=ExportSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return _build(cls, data, "")

    @classmethod
    def load(cls, path: str | os.PathLike, overrides: list[str] | None = None) -> TrainConfig:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"config {path} not found")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: top level must be a mapping")
        for item in overrides or []:
            apply_override(data, item)
        return cls.from_dict(data)


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to a nested dict in place."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ValueError(f"override {item!r} must look like section.key=value")
    *parents, leaf = key.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {item!r}: {p} is not a section")
    node[leaf] = yaml.safe_load(raw)


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"config section {where or '<root>'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown config key(s) in {where or '<root>'}: {', '.join(unknown)}; "
                         f"known: {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        default = fields[name].default_factory() if fields[name].default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value or {}, f"{where}{name}.")
        elif name == "betas":
            kwargs[name] = tuple(float(v) for v in value)
        else:
            kwargs[name] = _coerce(value, str(fields[name].type), f"{where}{name}")
    return cls(**kwargs)


def _coerce(value: Any, type_name: str, where: str) -> Any:
    """YAML reads ``1e-3`` as a string and ``3`` as an int: cast to the field's scalar type."""
    if value is None:
        return None
    base = type_name.replace(" | None", "")
    try:
        if base == "float" and not isinstance(value, bool):
            return float(value)
        if base == "int" and not isinstance(value, bool):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if base == "bool" and not isinstance(value, bool):
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"config key {where}: expected {base}, got {value!r}") from None
    return value
