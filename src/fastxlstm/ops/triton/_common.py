"""Shared Triton helpers and launch settings for the mLSTM kernels."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
#: ``FASTXLSTM_TRITON_AUTOTUNE=0`` launches the first (default) config of each kernel without tuning.
AUTOTUNE = os.environ.get("FASTXLSTM_TRITON_AUTOTUNE", "1") not in ("", "0")


def pow2(n: int, least: int = 16) -> int:
    """Smallest power of two >= max(n, least) (tile extents must be powers of two, dots >= 16)."""
    return max(least, triton.next_power_of_2(int(n)))


def dot_settings(dtype: torch.dtype) -> tuple[str, bool]:
    """(input precision of fp32 dots, whether materialised chunk states are kept in fp32).

    bf16 inputs keep chunk states in bf16 (they are a dot operand in bf16 anyway); fp16 inputs keep
    them in fp32 (fp16 could overflow) and use tf32 for the state dots; fp32 inputs use 3xTF32 dots on
    the GPU (fp32 accuracy on the tensor cores) and exact fp32 in the interpreter.
    """
    if dtype == torch.bfloat16:
        return "tf32", False
    if dtype == torch.float16:
        return "tf32", True
    return ("ieee" if INTERPRET else "tf32x3"), True


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dot_settings(dtype)[1] else dtype


def _fits(cfg: triton.Config, args: dict) -> bool:
    """Row tiles of the intra-chunk kernels must not be longer than the chunk; single-stage configs exist
    for fp32 inputs only (their tiles do not fit in shared memory otherwise; with bf16 inputs such a config
    of the output kernel faulted under Triton 3.6 on the H100, 2026-11-24)."""
    chunk = args.get("L")
    if chunk is not None and any(cfg.kwargs.get(k, 0) > chunk for k in ("BLQ", "BLK")):
        return False
    lead = args.get("Q", args.get("K"))
    if cfg.num_stages == 1 and ("BLQ" in cfg.kwargs or "BLK" in cfg.kwargs):
        return getattr(lead, "dtype", None) == torch.float32
    return True


#: Autotune key of every tuned kernel (``TK`` is a bucket of the problem size, unused inside the kernels).
TUNE_KEY = ["DQK", "DV", "L", "TK"]


def tune_configs(items: list[tuple[dict, int, int]]) -> list[triton.Config]:
    """``triton.Config`` per ``(kwargs, num_warps, num_stages)``."""
    return [triton.Config(kw, num_warps=w, num_stages=s) for kw, w, s in items]


def autotune(configs: list[triton.Config], key: list[str], interpret_config: triton.Config):
    """``triton.autotune`` with results cached on disk where this Triton supports it (configs whose row
    tiles exceed the chunk are pruned). In the interpreter ``interpret_config`` (small tiles, so that
    small test shapes span several) is used; with ``FASTXLSTM_TRITON_AUTOTUNE=0`` the first config that
    fits the chunk and the GPU's resources."""
    if INTERPRET:
        def deco(fn):
            def launcher(grid, *args, **kwargs):
                meta = dict(kwargs, **interpret_config.kwargs)
                return fn[grid(meta) if callable(grid) else grid](*args, **meta)
            return _Indexable(launcher)
        return deco
    if not AUTOTUNE:
        def deco(fn):
            chosen: dict[tuple, int] = {}

            def launcher(grid, *args, **kwargs):
                sig = tuple(str(a.dtype) for a in args if hasattr(a, "dtype")) + tuple(
                    (k, v) for k, v in sorted(kwargs.items()) if k in key)
                for idx in range(chosen.get(sig, 0), len(configs)):
                    cfg = configs[idx]
                    if not _fits(cfg, {**dict(zip(fn.arg_names, args)), **kwargs}):
                        continue
                    meta = dict(kwargs, **cfg.kwargs)
                    try:
                        out = fn[grid(meta) if callable(grid) else grid](
                            *args, **meta, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
                    except triton.runtime.errors.OutOfResources:
                        continue
                    chosen[sig] = idx
                    return out
                raise RuntimeError(f"no launch config of {fn} fits this GPU")
            return _Indexable(launcher)
        return deco

    def prune(configs, named_args, **kwargs):
        return [c for c in configs if _fits(c, {**named_args, **kwargs})]

    def deco(fn):
        try:
            return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune},
                                   cache_results=True)(fn)
        except TypeError:  # older Triton without cache_results
            return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune})(fn)
    return deco


class _Indexable:
    """Gives a plain launcher the ``kernel[grid](...)`` syntax."""

    def __init__(self, launcher):
        self._launcher = launcher

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self._launcher(grid, *args, **kwargs)


@triton.jit
def logsigmoid(x):
    """log(sigmoid(x)) = min(x, 0) - log1p(exp(-|x|)), accurate for large |x|."""
    y = tl.exp(-tl.abs(x))
    l1p = tl.where(y < 1e-4, y * (1.0 - 0.5 * y), tl.log(1.0 + y))
    return tl.minimum(x, 0.0) - l1p


@triton.jit
def max_fn(a, b):
    return tl.maximum(a, b)
