"""Timing helpers, random-weight model builders and the per-system result record."""

from __future__ import annotations

import gc
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

GB = 1e9


@dataclass
class Plan:
    """What to measure (shared by every system of a run)."""

    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 32, 128, 256])
    prompt_lengths: list[int] = field(default_factory=lambda: [2048, 8192, 32768, 65536])
    generate_lengths: list[int] = field(default_factory=lambda: [256, 1024])
    prefill_shapes: list[list[int]] = field(default_factory=lambda: [[1, 65536], [8, 8192], [64, 1024]])  # [b, s]
    decode_steps: int = 48
    decode_prompt: int = 32
    model: str = "random:xlstm-7b"
    small: bool = False  # smoke test: tiny configs for every system
    prefill_chunk: int = 4096
    state_dtype: str = "float32"  # fastxlstm decode state store (C); "bfloat16" is the opt-in
    deadline_s: float = 300.0  # per system
    deadlines: dict[str, float] = field(default_factory=dict)  # per-system overrides
    energy_s: float = 1.0  # shortest region over which a row's energy is read (0: no energy rows)
    grid: str = "custom"  # the preset the lists came from (recorded)

    def deadline_for(self, system: str) -> float:
        return float(self.deadlines.get(system, self.deadline_s))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


class Recorder:
    """Collects one system's results and rewrites its JSON file after every measurement, so a
    crash or time-out keeps what was measured."""

    def __init__(self, system: str, path: str | Path, deadline_s: float, energy_s: float = 0.0):
        self.path = Path(path)
        self.t0 = time.monotonic()
        self.deadline_s = deadline_s
        self.meter = None  # an energy.EnergyMeter when NVML is there (the worker opens it)
        self.energy_s = energy_s
        self.data: dict[str, Any] = {"system": system, "decode": [], "ttft": [], "prefill": [], "generate": [],
                                     "errors": [], "notes": []}
        self.flush()

    def time_left(self) -> float:
        return self.deadline_s - (time.monotonic() - self.t0)

    def out_of_time(self, what: str, need_s: float = 0.0) -> bool:
        if self.time_left() < need_s:
            self.data["errors"].append({"what": what, "error": "skipped: per-system time budget used up"})
            self.flush()
            return True
        return False

    def add(self, kind: str, **row: Any) -> None:
        self.data[kind].append(row)
        self.flush()

    def error(self, what: str, exc: BaseException) -> None:
        msg = f"{type(exc).__name__}: {exc}"
        self.data["errors"].append({"what": what, "error": msg[:2000]})
        self.flush()

    def set(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.flush()

    def flush(self) -> None:
        write_json(self.path, self.data)


def write_json(path: str | Path, data: Any) -> None:
    """Atomic: a reader (or a kill mid-write) sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def on_cuda() -> bool:
    return torch.cuda.is_available()


def device() -> str:
    """Where the bench runs: the GPU, or the CPU for the ``--tiny`` dry run."""
    return "cuda" if on_cuda() else "cpu"


def dtype() -> torch.dtype:
    """bf16 on the GPU (every figure); float32 for the CPU dry run (CPU bf16 matmuls are slow)."""
    return torch.bfloat16 if on_cuda() else torch.float32


def sync() -> None:
    if on_cuda():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds of one call (synchronised before and after)."""
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t0, out


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peak_gb() -> float:
    return torch.cuda.max_memory_allocated() / GB if torch.cuda.is_available() else float("nan")


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------- random models
@torch.no_grad()
def random_xlstm(config, device: str | torch.device, dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """A fastxlstm model with the paper's initialisation drawn on the device (seconds for the 7B,
    where the CPU-side ``build_model`` takes minutes)."""
    from ..model import XLSTMForCausalLM
    from ..model.norms import MultiHeadLayerNorm, RMSNorm

    with torch.device("meta"):
        model = XLSTMForCausalLM(config)
    model = model.to_empty(device=device).to(dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    d, nl, nh = config.embedding_dim, config.num_blocks, config.num_heads
    small = math.sqrt(2 / (5 * d))
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            mod.weight.normal_(0.0, small, generator=gen)
            if mod.bias is not None:
                mod.bias.zero_()
        elif isinstance(mod, (RMSNorm, MultiHeadLayerNorm)):
            mod.weight.fill_(1.0)
        elif isinstance(mod, torch.nn.Embedding):
            mod.weight.normal_(0.0, small, generator=gen)
    for block in model.backbone.blocks:
        layer, ffn = block.mlstm_layer, block.ffn
        ffn.proj_down.weight.normal_(0.0, 2 / nl / math.sqrt(ffn.ffn_dim), generator=gen)
        layer.out_proj.weight.normal_(0.0, 2 / nl / math.sqrt(d), generator=gen)
        if layer.fused:
            layer.ifgate_preact.weight.zero_()
            layer.ifgate_preact.bias[:nh] = -10.0
            layer.ifgate_preact.bias[nh:] = torch.linspace(3.0, 6.0, nh)
    return model.eval()


def graph_equals_eager(engine, n: int, steps: int) -> bool:
    """Whether ``steps`` greedy decode steps of slots ``0..n-1`` give the same tokens replayed from the
    engine's CUDA graphs as run eagerly, both runs starting from the slots' current states and pending
    tokens (the slots end where the eager run left them)."""
    start = [engine.get_slot_state(s) for s in range(n)]
    first = engine.tokens[:n].clone()
    runs, before = {}, engine.use_cuda_graph
    try:
        for graph in (True, False):
            engine.use_cuda_graph = graph
            for s in range(n):
                engine.set_slot_state(s, start[s])
            engine.decode_step(slots=list(range(n)), tokens=first, return_outputs=False)
            seq = [engine.tokens[:n].clone()]
            for _ in range(steps - 1):
                engine.decode_step(return_outputs=False)
                seq.append(engine.tokens[:n].clone())
            runs[graph] = torch.stack(seq, 1).tolist()
    finally:
        engine.use_cuda_graph = before
    return runs[True] == runs[False]


def seeded_tokens(n: int, vocab: int, batch: int = 1, seed: int = 0, device: str | None = None) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(3, vocab, (batch, n), generator=gen).to(device or _device())


_device = device  # seeded_tokens' argument of the same name shadows it
