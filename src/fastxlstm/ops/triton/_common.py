"""Shared Triton helpers and launch settings for the mLSTM kernels."""

from __future__ import annotations

import functools
import inspect
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
#: ``FASTXLSTM_TRITON_AUTOTUNE=0`` launches the first (default) config of each kernel without tuning.
AUTOTUNE = os.environ.get("FASTXLSTM_TRITON_AUTOTUNE", "1") not in ("", "0")


#: input precision of the dots for fp32 inputs on the GPU (``FASTXLSTM_TRITON_FP32_DOT``: tf32x3 or ieee).
FP32_DOT = os.environ.get("FASTXLSTM_TRITON_FP32_DOT", "tf32x3")


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
    return ("ieee" if INTERPRET else FP32_DOT), True


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


def tuned(kernel, names: str, interpret: tuple, rows: list[tuple]):
    """The :func:`autotune` launcher of ``kernel`` (keyed by :data:`TUNE_KEY`), one config per row:
    the values of the constexprs ``names`` (space separated), then ``num_warps`` and ``num_stages``;
    ``interpret`` holds the constexpr values used in the interpreter."""
    keys = names.split()
    configs = [triton.Config(dict(zip(keys, row[:-2], strict=True)), num_warps=row[-2], num_stages=row[-1])
               for row in rows]
    interpret_config = triton.Config(dict(zip(keys, interpret, strict=True)))
    return autotune(configs, key=TUNE_KEY, interpret_config=interpret_config)(kernel)


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
                    launcher.best_config = cfg
                    return out
                raise RuntimeError(f"no launch config of {fn} fits this GPU")
            return FastLaunch(_Indexable(launcher), fn, lambda: launcher.best_config)
        return deco

    def prune(configs, named_args, **kwargs):
        return [c for c in configs if _fits(c, {**named_args, **kwargs})]

    def deco(fn):
        try:
            tuned = triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune},
                                    cache_results=True)(fn)
        except TypeError:  # older Triton without cache_results
            tuned = triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune})(fn)
        return FastLaunch(tuned, fn, lambda: tuned.best_config)
    return deco


def fast(fn):
    """A plain ``@triton.jit`` kernel with the :class:`FastLaunch` path (identity in the interpreter)."""
    return fn if INTERPRET else FastLaunch(fn, fn, None)


#: ``FASTXLSTM_TRITON_FAST_LAUNCH=0`` sends every launch through Triton's own (slower) launch path.
FAST_LAUNCH = os.environ.get("FASTXLSTM_TRITON_FAST_LAUNCH", "1") not in ("", "0")


def _spec(x) -> object:
    """What Triton's launcher specialises a compiled kernel on, for one runtime argument: a tensor's dtype
    and 16-byte alignment; an int's width class, ``== 1`` and divisibility by 16; a float's type."""
    if isinstance(x, torch.Tensor):
        return x.dtype, x.data_ptr() % 16 == 0
    if isinstance(x, bool):
        return bool, x
    if isinstance(x, int):
        return int, x == 1, x % 16 == 0, -(1 << 31) <= x < (1 << 31), x < (1 << 63)
    if isinstance(x, float):
        return float
    return type(x), x


class FastLaunch:
    """Launches a kernel through its compiled handle once a call with the same specialisation went
    through Triton's own path (autotuning and compiling there), skipping the autotuner's and the JIT
    binder's per-call Python work (~13 launches per forward+backward, host-bound at small sizes).

    The cache key holds everything the compiled kernel depends on: the exact keyword arguments
    (constexprs and the autotune bucket ``TK``), and per positional argument what Triton specialises
    on (:func:`_spec`). Any failure of the direct launch turns the fast path off for this kernel. Launch
    hooks (a Triton-level profiler) are checked when an entry is cached, not on every launch: set them
    before the first call, or set ``FASTXLSTM_TRITON_FAST_LAUNCH=0``.
    """

    def __init__(self, launcher, fn, config_of):
        self._launcher = launcher  # what ``kernel[grid](...)`` goes through the first time
        self._fn = fn  # the JITFunction
        self._config_of = config_of  # -> the triton.Config the launcher just used (None: plain kernel)
        self._cache: dict[tuple, tuple] = {}
        self._names = list(fn.arg_names)
        self._defaults = {name: p.default for name, p in inspect.signature(fn.fn).parameters.items()
                          if p.default is not inspect.Parameter.empty}
        self.enabled = FAST_LAUNCH
        self.fallback_reason: str | None = None

    @property
    def cache(self) -> dict:
        """The autotuner's cache (key -> chosen config), where there is one."""
        return getattr(self._launcher, "cache", {})

    def __getitem__(self, grid):
        return functools.partial(self._call, grid)

    def _call(self, grid, *args, **kwargs):
        if not self.enabled:
            return self._launcher[grid](*args, **kwargs)
        key = (torch.cuda.current_device(), tuple(map(_spec, args)), tuple(kwargs.items()))
        hit = self._cache.get(key)
        if hit is None:
            return self._first(key, grid, args, kwargs)
        kernel, meta, tail, dev = hit
        g = grid(meta) if callable(grid) else grid
        try:
            kernel.run(g[0], g[1] if len(g) > 1 else 1, g[2] if len(g) > 2 else 1, _stream(dev), kernel.function,
                       kernel.packed_metadata, None, None, None, *args, *tail)
        except Exception as exc:  # noqa: BLE001 - an internal interface changed: use Triton's path from now on
            self.enabled = False
            self.fallback_reason = repr(exc)[:200]
            return self._launcher[grid](*args, **kwargs)
        return kernel

    def _first(self, key, grid, args, kwargs):
        kernel = self._launcher[grid](*args, **kwargs)
        if kernel is None or not hasattr(kernel, "run") or _launch_hooks():
            return kernel  # no compiled handle, or launch hooks (a profiler) that want Triton's own path
        cfg = self._config_of() if self._config_of is not None else None
        meta = dict(kwargs, **(cfg.kwargs if cfg is not None else {}))
        missing = [n for n in self._names[len(args):] if n not in meta and n not in self._defaults]
        if missing:
            return kernel
        tail = tuple(meta[n] if n in meta else self._defaults[n] for n in self._names[len(args):])
        self._cache[key] = (kernel, {**self._defaults, **meta}, tail, key[0])
        return kernel


def _hook_set(hook) -> bool:
    """A launch hook is set: a callable, or a non-empty chain (Triton >= 3.5 keeps an empty ``HookChain``)."""
    return hook is not None and (not hasattr(hook, "calls") or bool(hook.calls))


def _launch_hooks() -> bool:
    """Whether launch enter/exit hooks are set (or cannot be read): then only Triton's path launches."""
    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    if runtime is not None:
        return _hook_set(getattr(runtime, "launch_enter_hook", True)) or _hook_set(
            getattr(runtime, "launch_exit_hook", None))
    try:
        from triton.compiler import CompiledKernel
    except ImportError:
        return True
    return _hook_set(getattr(CompiledKernel, "launch_enter_hook", True)) or _hook_set(
        getattr(CompiledKernel, "launch_exit_hook", None))


_STREAM = None


def _stream(device: int):
    global _STREAM
    if _STREAM is None:
        from triton.runtime import driver

        _STREAM = driver.active.get_current_stream
    return _STREAM(device)


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
def head_norm_ogate(hv, w, o, eps, DV: tl.constexpr, dtype: tl.constexpr):
    """One head's ``sigmoid(o) * LayerNorm(h) * w`` for float32 ``hv`` ``[DV]`` (h already rounded to
    ``dtype``), rounding each step to ``dtype`` where the model's modules do."""
    mean = tl.sum(hv, axis=0) / DV
    cen = hv - mean
    var = tl.sum(cen * cen, axis=0) / DV
    y = (cen * tl.rsqrt(var + eps)).to(dtype)
    y = (y.to(tl.float32) * w.to(tl.float32)).to(dtype)
    s = (1.0 / (1.0 + tl.exp(-o.to(tl.float32)))).to(dtype)
    return (s.to(tl.float32) * y.to(tl.float32)).to(dtype)


@triton.jit
def tanh(x):
    """tanh through exp, overflow-safe (``exp(2x)`` -> inf gives 1, -> 0 gives -1): the gate and logit soft
    caps' (the one Triton copy: the decode cell, the engine's gates kernel and its GEMVs use it)."""
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def max_fn(a, b):
    return tl.maximum(a, b)


@triton.jit
def load_tile(base, rows, mr, cols, mc, stride):
    """The ``[rows, cols]`` tile of a row-major matrix at ``base`` (``stride`` elements a row), 0 off the masks."""
    return tl.load(base + rows[:, None] * stride + cols[None, :], mask=mr[:, None] & mc[None, :], other=0.0)


@triton.jit
def store_tile(base, rows, mr, cols, mc, stride, x):
    """Stores ``x`` (cast to the pointee type) as the ``[rows, cols]`` tile of a row-major matrix at ``base``."""
    tl.store(base + rows[:, None] * stride + cols[None, :], x.to(base.dtype.element_ty), mask=mr[:, None] & mc[None, :])


@triton.jit
def scale_rows(x, inv):
    """``x`` with row ``r`` multiplied by ``inv[r]`` in fp32, back in x's dtype (dh divided by the denominator)."""
    return (x.to(tl.float32) * inv[:, None]).to(x.dtype)


@triton.jit
def state_dot(a, st, PREC: tl.constexpr, STATE_F32: tl.constexpr):
    """``a @ st`` with ``st`` a tile of a chunk state: in fp32 at ``PREC`` where the states are kept in fp32,
    otherwise in the inputs' dtype (the states have it then)."""
    if STATE_F32:
        out = tl.dot(a.to(tl.float32), st, input_precision=PREC)
    else:
        out = tl.dot(a, st.to(a.dtype))
    return out


@triton.jit
def chunk_rows(pid, S, DQK: tl.constexpr, DQKP: tl.constexpr, L: tl.constexpr, BL: tl.constexpr):
    """Offsets of an intra-chunk program: ``(ci, rows, mask, chunk_rows, mask, cols, mask)``, its ``BL``
    rows (tile ``pid``), the ``L`` rows of their chunk ``ci`` and the DQK columns (``DQKP`` wide)."""
    r0 = pid * BL
    ci = r0 // L
    c0 = ci * L
    offs_r = r0 + tl.arange(0, BL)
    offs_c = c0 + tl.arange(0, L)
    offs_d = tl.arange(0, DQKP)
    return ci, offs_r, offs_r < S, offs_c, offs_c < S, offs_d, offs_d < DQK


@triton.jit
def causal_decay(offs_t, mt, bt, m_t, offs_s, ms, b_s, i_s, KEYS_ON_ROWS: tl.constexpr):
    """The intra-chunk decay ``D_ts = exp((b_t - b_s) + (i_s - m_t))`` of queries ``t`` and keys ``s <= t``
    (0 elsewhere and off the masks): ``[t, s]``, or ``[s, t]`` with ``KEYS_ON_ROWS``."""
    if KEYS_ON_ROWS:
        keep = (offs_s[:, None] <= offs_t[None, :]) & ms[:, None] & mt[None, :]
        x = (bt[None, :] - b_s[:, None]) + (i_s[:, None] - m_t[None, :])
    else:
        keep = (offs_s[None, :] <= offs_t[:, None]) & ms[None, :] & mt[:, None]
        x = (bt[:, None] - b_s[None, :]) + (i_s[None, :] - m_t[:, None])
    return tl.exp(tl.where(keep, x, -float("inf")))


@triton.jit
def dv_part(pid_v, DV: tl.constexpr, NVP: tl.constexpr):
    """First and end column of the ``pid_v``-th of ``NVP`` parts of DV (a program's share of the value tiles)."""
    part = (DV + NVP - 1) // NVP
    return pid_v * part, pid_v * part + part
