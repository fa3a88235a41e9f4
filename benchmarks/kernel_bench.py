"""mLSTM kernels: GPU accuracy check and benchmark against the official kernels and SDPA.

  python benchmarks/kernel_bench.py --check            # accuracy at the 7B shapes vs a float64 reference
  python benchmarks/kernel_bench.py --bench            # timings (JSON + markdown table + plot)
  python benchmarks/kernel_bench.py --bench --quick    # a subset (B=1, S in {8k, 32k}) with a per-kernel breakdown
  python benchmarks/kernel_bench.py --diag             # host vs GPU time at B=1 (launch path), cProfile, profiler
  python benchmarks/kernel_bench.py --fp32             # fp32 h error next to the float32 reference's own
  python benchmarks/kernel_bench.py --sweep            # small-S forward: old vs current autotune rows, per config
  python benchmarks/kernel_bench.py --layout           # 7B prefill: q/k/v read in place vs head-major copies

Shapes: xLSTM 7B cell (NH 8, DQK 256, DV 512), bf16 q/k/v, fp32 gates. Peers in the same run:
``mlstm-kernels`` (``chunkwise--triton_xl_chunk``, ``chunkwise--triton_limit_chunk``; PyPI) and torch SDPA
causal attention at Llama-3-8B shapes (32 query heads, 8 KV heads, D 128). Each figure comes with its floor:
the bytes that must cross HBM (inputs read once, outputs written once) and the FLOPs of the chunkwise
algorithm (chunk 64, causal half of the intra-chunk part), each over the ceilings measured in this run.
``--tiny`` runs everything on tiny shapes (CPU interpreter dry run of this script).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import platform
import sys
import time
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fastxlstm.ops.reference import mlstm_chunkwise_reference, mlstm_step_reference  # noqa: E402

NH, DQK, DV = 8, 256, 512
LLAMA = {"heads": 32, "kv_heads": 8, "d": 128}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("nan")
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def poison(device: torch.device) -> None:
    """Fill the allocator's free blocks with NaN so that unwritten outputs show up."""
    if device.type != "cuda":
        return
    free = torch.cuda.mem_get_info()[0]
    size = min(int(free * 0.5), 8 << 30) // 4
    junk = torch.empty(size, device=device, dtype=torch.float32)
    junk.fill_(float("nan"))
    del junk


def make_inputs(b, s, dtype, device, seed, with_state=False, dqk=DQK, dv=DV, nh=NH):
    """Fresh random inputs; gates spread like a trained 7B (input gate mostly negative, forget gate
    mostly open) but with a wide tail, soft-capped at 15 as in the model."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rn(*shape):
        return torch.randn(*shape, generator=g)

    q, k = rn(b, nh, s, dqk), rn(b, nh, s, dqk)
    v = rn(b, nh, s, dv)
    i = 15 * torch.tanh((rn(b, nh, s) * 4 - 3) / 15)
    f = 15 * torch.tanh((rn(b, nh, s) * 3 + 4) / 15)
    out = [t.to(device, dtype) for t in (q, k, v)] + [t.to(device) for t in (i, f)]
    state = None
    if with_state:
        state = (rn(b, nh, dqk, dv).to(device) * 0.3, rn(b, nh, dqk).to(device), rn(b, nh).to(device))
    return out, state


# ----------------------------------------------------------------------------------------- check
def check(args, device) -> dict:
    from fastxlstm.ops import triton as T

    results = {"forward": [], "backward": [], "step": []}
    s_fwd = 8192 if not args.tiny else 100
    s_odd = 2000 if not args.tiny else 45
    s_bwd = 2048 if not args.tiny else 64
    tiny = dict(dqk=24, dv=40, nh=2) if args.tiny else {}
    seed = int(time.time()) % 100000  # fresh inputs each run
    kc = dict(kernel_chunk=32) if args.tiny else {}
    dtypes = [torch.bfloat16, torch.float16, torch.float32] if not args.tiny else [torch.float32]
    for dtype in dtypes:
        for b, s, with_state in ((1, s_fwd, False), (2, s_odd, True)):
            (q, k, v, i, f), st = make_inputs(b, s, dtype, device, seed, with_state, **tiny)
            seed += 1
            poison(device)
            h, (c, n, m) = T.mlstm_chunkwise(q, k, v, i, f, st, **kc)
            torch.cuda.synchronize() if device.type == "cuda" else None
            ref_in = [t.double() for t in (q, k, v, i, f)]
            hr, (cr, nr, mr) = mlstm_chunkwise_reference(*ref_in, None if st is None else tuple(x.double() for x in st),
                                                         chunk_size=64)
            row = {"dtype": str(dtype).split(".")[-1], "B": b, "S": s, "state": with_state,
                   "h": rel(h, hr), "C": rel(c, cr), "n": rel(n, nr), "m": rel(m, mr),
                   "nan": bool(torch.isnan(h).any() or torch.isnan(c).any())}
            results["forward"].append(row)
            print("fwd", row, flush=True)
            del h, c, n, m, hr, cr, nr, mr
    for dtype in ([torch.bfloat16, torch.float32] if not args.tiny else [torch.float32]):
        for b, s, with_state in ((1, s_bwd, False), (1, s_bwd - 47, True)):
            (q, k, v, i, f), st = make_inputs(b, s, dtype, device, seed, with_state, **tiny)
            seed += 1
            leaves = [q, k, v, i, f] + (list(st) if st is not None else [])
            ours = [t.detach().clone().requires_grad_() for t in leaves]
            ref = [t.detach().double().requires_grad_() for t in leaves]
            poison(device)
            _weighted_loss(T.mlstm_chunkwise, ours, seed, device, **kc).backward()
            _weighted_loss(mlstm_chunkwise_reference, ref, seed, device, chunk_size=64).backward()
            names = ["q", "k", "v", "i", "f", "C0", "n0", "m0"]
            row = {"dtype": str(dtype).split(".")[-1], "B": b, "S": s, "state": with_state}
            row.update({nm: rel(a.grad, r.grad) for nm, a, r in zip(names, ours, ref)})
            results["backward"].append(row)
            print("bwd", row, flush=True)
    # decode step: functional, in place, and replayed from a CUDA graph
    for b in ((1, 64) if not args.tiny else (3,)):
        (q, k, v, i, f), st = make_inputs(b, 8, torch.bfloat16 if not args.tiny else torch.float32, device, seed,
                                          True, **tiny)
        seed += 1
        steps = [tuple(t[:, :, j].contiguous() for t in (q, k, v, i, f)) for j in range(8)]
        h_fun, s_fun = T.mlstm_step(*steps[0], st)
        h0, s0 = mlstm_step_reference(*(t.double() for t in steps[0]), tuple(x.double() for x in st))
        c, n, m = (x.clone().contiguous() for x in st)
        ref_state = tuple(x.double() for x in st)
        hbuf = torch.empty(steps[0][2].shape, device=device, dtype=q.dtype)
        graph = None
        if device.type == "cuda":
            static = [torch.empty_like(t) for t in steps[0]]
            warm = tuple(x.clone() for x in st)
            T.mlstm_step_(*steps[0], *warm, hbuf)  # compile before capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                T.mlstm_step_(*static, c, n, m, hbuf)
        errs = []
        for xs in steps:
            hr, ref_state = mlstm_step_reference(*(t.double() for t in xs), ref_state)
            if graph is not None:
                for dst, src in zip(static, xs):
                    dst.copy_(src)
                graph.replay()
            else:
                T.mlstm_step_(*xs, c, n, m, hbuf)
            errs.append(rel(hbuf, hr))
        row = {"B": b, "graph": graph is not None, "h_max_over_8_steps": max(errs), "C": rel(c, ref_state[0]),
               "n": rel(n, ref_state[1]), "m": rel(m, ref_state[2]), "functional_h": rel(h_fun, h0),
               "functional_C": rel(s_fun[0], s0[0])}
        results["step"].append(row)
        print("step", row, flush=True)
    return results


# ----------------------------------------------------------------------------------------- bench
def measure_ceilings(device) -> dict:
    if device.type != "cuda":
        return {"copy_GBps": 1.0, "bf16_TFLOPs": 1.0}
    import triton.testing as tt

    x = torch.empty(1 << 30, device=device, dtype=torch.uint8).random_(0, 255)
    t = tt.do_bench(functools.partial(torch.Tensor.copy_, torch.empty_like(x), x), warmup=25, rep=200,
                    return_mode="median")
    bw = 2 * x.numel() / (t * 1e-3) / 1e9
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    t = tt.do_bench(functools.partial(torch.matmul, a, torch.randn_like(a)), warmup=25, rep=200,
                    return_mode="median")
    tf = 2 * 8192 ** 3 / (t * 1e-3) / 1e12
    return {"copy_GBps": bw, "bf16_TFLOPs": tf}


def mlstm_floor(b, s, fwd_bwd: bool, ceil: dict, chunk: int = 64) -> dict:
    tok = b * NH * s
    io = tok * (2 * DQK * 2 + DV * 2 + 2 * 4) + tok * DV * 2  # q,k,v,i,f in, h out
    fl = tok * (4 * DQK * DV + chunk * (DQK + DV))
    if fwd_bwd:
        io += tok * DV * 2 + tok * (2 * DQK * 2 + DV * 2 + 2 * 4)  # dh in; dq,dk,dv,di,df out
        fl += tok * (8 * DQK * DV + chunk * (3 * DQK + 2 * DV))
    t = max(io / (ceil["copy_GBps"] * 1e9), fl / (ceil["bf16_TFLOPs"] * 1e12)) * 1e3
    return {"bytes": io, "flops": fl, "floor_ms": t}


def sdpa_floor(b, s, fwd_bwd: bool, ceil: dict) -> dict:
    h, kvh, d = LLAMA["heads"], LLAMA["kv_heads"], LLAMA["d"]
    io = b * s * d * 2 * (h + 2 * kvh + h)
    fl = 2 * b * h * s * s * d  # causal: half of 4 S^2 D per head
    if fwd_bwd:
        io *= 2
        fl *= 3.5  # backward = 2.5x forward (5 matmuls instead of 2)
    t = max(io / (ceil["copy_GBps"] * 1e9), fl / (ceil["bf16_TFLOPs"] * 1e12)) * 1e3
    return {"bytes": io, "flops": fl, "floor_ms": t}


def _forward_only(fn, args):
    with torch.no_grad():
        return fn(*args)


def _forward_backward(fn, leaves, grad):
    for t in leaves:
        t.grad = None
    fn(*leaves).backward(grad)


def _h_only(fn, *args, **kwargs):
    return fn(*args, **kwargs)[0]


def _sdpa(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def _weighted_loss(fn, xs, seed, device, **kw):
    """sum of every output times fixed random weights (the same for both implementations)."""
    h, (c, n, m) = fn(*xs[:5], tuple(xs[5:]) if len(xs) > 5 else None, **kw)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    w = [torch.randn(t.shape, generator=gen).to(device) for t in (h, c, n, m)]
    return sum((t.double() * wt.double()).sum() for t, wt in zip((h, c, n, m), w))


def timeit(device, fn, *args, budget_s: float = 0.3) -> float:
    """Median ms of ``fn(*args)``; repetitions adapted to the run time (L2 flushed between runs by do_bench)."""
    fn = functools.partial(fn, *args)
    if device.type != "cuda":
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    import triton.testing as tt

    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    one = (time.perf_counter() - t0) * 1e3
    rep = max(3 * one, min(budget_s * 1e3, 60 * one))
    return tt.do_bench(fn, warmup=max(one, 5), rep=rep, return_mode="median")


def impls(tiny: bool):
    from fastxlstm.ops import triton as T

    out = {}
    kc = dict(kernel_chunk=32) if tiny else {}
    for chunk in ((None,) if tiny else (128,)):
        name = "fastxlstm" if chunk is None or chunk == 128 else f"fastxlstm-L{chunk}"
        kw = dict(kc) if chunk is None else dict(kernel_chunk=chunk)
        out[name] = lambda q, k, v, i, f, kw=kw: T.mlstm_chunkwise(q, k, v, i, f, **kw)[0]
    try:
        from mlstm_kernels.torch import get_mlstm_kernel

        for name in ("chunkwise--triton_xl_chunk", "chunkwise--triton_limit_chunk"):
            fn = get_mlstm_kernel(name)
            out[name.split("--")[1]] = lambda q, k, v, i, f, fn=fn: fn(q=q, k=k, v=v, i=i, f=f)
    except Exception as exc:  # noqa: BLE001
        print(f"official mlstm-kernels not available: {exc!r}", flush=True)
    return out


def bench(args, device) -> dict:
    ceil = measure_ceilings(device)
    print("ceilings", ceil, flush=True)
    res = {"ceilings": ceil, "chunkwise": [], "sdpa": [], "decode": []}
    batches = (1,) if args.quick else (1, 8)
    seqs = (8192, 32768) if args.quick else (2048, 8192, 32768, 65536)
    if args.tiny:
        batches, seqs = (1,), (64, 128)
    if not args.tiny and device.type == "cuda":  # first: cheap, and independent of the big shapes below
        res["decode"] = bench_decode(device, ceil, (1, 8) if args.quick else (1, 8, 64, 256))
    kern = impls(args.tiny)
    tiny = dict(dqk=24, dv=40, nh=2) if args.tiny else {}
    dtype = torch.bfloat16 if not args.tiny else torch.float32
    for b in batches:
        for s in seqs:
            (q, k, v, i, f), _ = make_inputs(b, s, dtype, device, seed=b * 7 + s, **tiny)
            dh = torch.randn_like(v)
            for name, fn in kern.items():
                row = {"impl": name, "B": b, "S": s}
                if not args.tiny and b * s >= 8 * (32768 if name == "triton_limit_chunk" else 65536) and name in (
                        "triton_limit_chunk", "triton_xl_chunk"):
                    # mlstm-kernels 2.0.6 faulted (CUDA illegal memory access) here under Triton 3.6 on the H100:
                    # limit_chunk at B8 S32k (2026-11-24), xl_chunk at B8 S64k in its forward (2026-11-25; v then
                    # has 2.1e9 > 2^31 elements); a fault poisons the CUDA context for everything after it
                    row["error"] = "skipped: faults at this size (illegal memory access)"
                    row["floor_fwd"] = mlstm_floor(b, s, False, ceil)
                    row["floor_fwdbwd"] = mlstm_floor(b, s, True, ceil)
                    res["chunkwise"].append(row)
                    continue
                try:
                    row["fwd_ms"] = timeit(device, _forward_only, fn, (q, k, v, i, f))
                    leaves = [t.detach().requires_grad_() for t in (q, k, v, i, f)]
                    row["fwdbwd_ms"] = timeit(device, _forward_backward, fn, leaves, dh)
                    if b == 1 and s <= 8192 and device.type == "cuda" and not args.tiny:
                        # GPU time alone (replayed from a CUDA graph: no host launch work) where launches show
                        row["graph_fwd_ms"] = _graph_ms(functools.partial(_forward_only, fn, (q, k, v, i, f)))
                        row["graph_fwdbwd_ms"] = _graph_ms(functools.partial(_forward_backward, fn, leaves, dh))
                    del leaves
                except Exception as exc:  # noqa: BLE001
                    row["error"] = repr(exc)[:300]
                    torch.cuda.empty_cache() if device.type == "cuda" else None
                row["floor_fwd"] = mlstm_floor(b, s, False, ceil)
                row["floor_fwdbwd"] = mlstm_floor(b, s, True, ceil)
                res["chunkwise"].append(row)
                print("chunkwise", {k_: (round(v_, 4) if isinstance(v_, float) else v_) for k_, v_ in row.items()
                                    if not k_.startswith("floor")}, flush=True)
            del q, k, v, i, f, dh
            if args.tiny:
                continue
            row = {"impl": "sdpa-llama3-8b", "B": b, "S": s}
            try:
                hq, hk, d = LLAMA["heads"], LLAMA["kv_heads"], LLAMA["d"]
                qa = torch.randn(b, hq, s, d, device=device, dtype=torch.bfloat16)
                ka = torch.randn(b, hk, s, d, device=device, dtype=torch.bfloat16)
                va = torch.randn(b, hk, s, d, device=device, dtype=torch.bfloat16)
                row["fwd_ms"] = timeit(device, _forward_only, _sdpa, (qa, ka, va))
                leaves = [t.detach().requires_grad_() for t in (qa, ka, va)]
                row["fwdbwd_ms"] = timeit(device, _forward_backward, _sdpa, leaves, torch.randn_like(qa))
                del qa, ka, va, leaves
            except Exception as exc:  # noqa: BLE001
                row["error"] = repr(exc)[:300]
            row["floor_fwd"] = sdpa_floor(b, s, False, ceil)
            row["floor_fwdbwd"] = sdpa_floor(b, s, True, ceil)
            res["sdpa"].append(row)
            print("sdpa", {k_: v_ for k_, v_ in row.items() if not k_.startswith("floor")}, flush=True)
            torch.cuda.empty_cache()
    if args.quick and not args.tiny and device.type == "cuda":
        res["breakdown"] = breakdown(device)
    res["fast_launch"] = fast_launch_report()
    print("fast launch", res["fast_launch"], flush=True)
    return res


def fast_launch_report() -> dict:
    """Per launcher of ours: whether the direct launch path is on, its cached entries, any fallback."""
    from fastxlstm.ops.triton import _bwd, _common, _fwd

    out = {}
    for mod in (_fwd, _bwd):
        for name, obj in vars(mod).items():
            if isinstance(obj, _common.FastLaunch):
                out[name] = {"enabled": obj.enabled, "cached": len(obj._cache), "fallback": obj.fallback_reason}
    return out


def bench_decode(device, ceil, batches) -> list:
    """32 layers of the 7B cell state updated by one step each, captured in one CUDA graph."""

    rows = []
    layers = 32
    try:
        from mlstm_kernels.torch.recurrent.triton_step import mlstm_recurrent_step__triton_fw as official_step
    except Exception:  # noqa: BLE001
        official_step = None
    for b in batches:
        (q, k, v, i, f), st = make_inputs(b, 1, torch.bfloat16, device, seed=b, with_state=True)
        q, k, v = (t[:, :, 0].contiguous() for t in (q, k, v))
        i, f = (t[:, :, 0].contiguous() for t in (i, f))
        states = [tuple(x.clone() for x in st) for _ in range(layers)]
        h = torch.empty(b, NH, DV, device=device, dtype=torch.bfloat16)
        bytes_state = layers * b * NH * (DQK * DV + DQK + 1) * 4 * 2
        row = {"B": b, "layers": layers, "state_bytes_rw": bytes_state,
               "floor_ms": bytes_state / (ceil["copy_GBps"] * 1e9) * 1e3}

        row["fastxlstm_ms"] = graph_time(_our_steps, states, (q, k, v, i, f), h)
        if official_step is not None:
            try:
                i3, f3 = i[..., None], f[..., None]
                outs = [tuple(x.clone() for x in st) for _ in range(layers)]
                m3 = [s_[2][..., None].contiguous() for s_ in states]
                mo3 = [o[2][..., None].contiguous() for o in outs]

                row["official_triton_step_ms"] = graph_time(_official_steps, official_step, states, m3, outs, mo3,
                                                            (q, k, v, i3, f3))
                del outs
            except Exception as exc:  # noqa: BLE001
                row["official_error"] = repr(exc)[:300]
        # the 7B decode step's own floor: every weight read once (bf16), or the matmuls at peak
        params = 6.87e9
        step_floor = max(params * 2 / (ceil["copy_GBps"] * 1e9), 2 * params * b / (ceil["bf16_TFLOPs"] * 1e12)) * 1e3
        row["model_step_floor_ms_excl_state"] = step_floor
        row["share_of_step"] = row["fastxlstm_ms"] / (step_floor + row["fastxlstm_ms"])
        rows.append(row)
        print("decode", row, flush=True)
        del states
        torch.cuda.empty_cache()
    return rows


def _our_steps(states, x, h):
    from fastxlstm.ops import triton as T

    for c, n, m in states:
        T.mlstm_step_(*x, c, n, m, h)


def _official_steps(step, states, m3, outs, mo3, x):
    for (c, n, _), m_, (co, no, _), mo in zip(states, m3, outs, mo3):
        step(c, n, m_, *x, matC_new=co, vecN_new=no, scaM_new=mo)


def graph_time(fn, *args) -> float:
    import triton.testing as tt

    fn = functools.partial(fn, *args)
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return tt.do_bench(g.replay, warmup=20, rep=200, return_mode="median")


def breakdown(device) -> list:
    """Per-kernel CUDA times of ours (forward + backward at B=1, S=8k, after tuning), from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    from fastxlstm.ops import triton as T

    rows = []
    for chunk in (128,):
        (q, k, v, i, f), _ = make_inputs(1, 8192, torch.bfloat16, device, seed=3)
        leaves = [t.detach().requires_grad_() for t in (q, k, v, i, f)]
        dh = torch.randn_like(v)
        fn = functools.partial(_h_only, T.mlstm_chunkwise, kernel_chunk=chunk)
        for _ in range(3):
            _forward_backward(fn, leaves, dh)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                _forward_backward(fn, leaves, dh)
            torch.cuda.synchronize()
        for ev in prof.key_averages():
            if ev.device_type.name == "CUDA" or getattr(ev, "self_device_time_total", 0) > 0:
                t = getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0)
                if t > 0:
                    rows.append({"chunk": chunk, "kernel": ev.key[:60], "us_per_call": t / max(ev.count, 1),
                                 "calls_per_iter": ev.count / 5})
        mine = [r for r in rows if r["chunk"] == chunk]
        for r in sorted(mine, key=lambda r: -r["us_per_call"] * r["calls_per_iter"]):
            print("breakdown", r, flush=True)
    return rows


# ----------------------------------------------------------------------------------------- diagnostics
def _graph_ms(fn, calls: int = 1, rep: int = 200) -> float:
    """GPU ms per call of ``fn`` replayed from a CUDA graph of ``calls`` calls (no host launch work; with
    several, the in-graph launch gaps as in the engine's prefill graph), L2 flushed between replays (do_bench
    median over ``rep`` ms)."""
    import triton.testing as tt

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    return tt.do_bench(g.replay, warmup=20, rep=rep, return_mode="median") / calls


def _host_ms(fn, n: int = 30) -> tuple[float, float]:
    """(host ms per call to enqueue ``fn`` without waiting, wall ms per call including the final sync)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return (t1 - t0) * 1e3 / n, (t2 - t0) * 1e3 / n


def diag(args, device) -> dict:
    """Host vs GPU time of the chunkwise op at small sizes: event timing (as --bench), host enqueue time,
    CUDA-graph replay (GPU only), with and without the fast launch path; profiler and cProfile summaries."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile

    from fastxlstm.ops import triton as T
    from fastxlstm.ops.triton import _bwd, _fwd

    launchers = {n: getattr(m, n) for m, names in ((_fwd, ("fwd_gates", "fwd_states", "fwd_out")), (
        _bwd, ("bwd_prep", "bwd_dstates", "bwd_dq", "bwd_dk", "bwd_dv", "bwd_gates_a", "bwd_gates_b",
               "bwd_gates_c"))) for n in names}

    def set_fast(on: bool) -> None:
        for ln in launchers.values():
            ln.enabled = on

    kern = impls(False)
    rows = []
    for s in ((2048, 8192) if not args.tiny else (64,)):
        (q, k, v, i, f), _ = make_inputs(1, s, torch.bfloat16, device, seed=11 + s)
        dh = torch.randn_like(v)
        for name in ("fastxlstm", "triton_xl_chunk"):
            if name not in kern:
                continue
            for fast in ((True, False) if name == "fastxlstm" else (None,)):
                if fast is not None:
                    set_fast(fast)
                for mode in ("fwd", "fwdbwd"):
                    if mode == "fwd":
                        fn = functools.partial(_forward_only, kern[name], (q, k, v, i, f))
                    else:
                        leaves = [t.detach().requires_grad_() for t in (q, k, v, i, f)]
                        fn = functools.partial(_forward_backward, kern[name], leaves, dh)
                    row = {"S": s, "impl": name, "fast_launch": fast, "mode": mode}
                    row["event_ms"] = timeit(device, fn)
                    row["host_enqueue_ms"], row["wall_ms"] = _host_ms(fn)
                    try:
                        row["graph_ms"] = _graph_ms(fn)
                    except Exception as exc:  # noqa: BLE001
                        row["graph_error"] = repr(exc)[:200]
                    rows.append(row)
                    print("diag", {k_: (round(v_, 4) if isinstance(v_, float) else v_) for k_, v_ in row.items()},
                          flush=True)
        if s == 8192:  # bit-identical outputs with and without the fast path
            leaves = [t.detach().requires_grad_() for t in (q, k, v, i, f)]
            outs = []
            for fast in (False, True):
                set_fast(fast)
                for t in leaves:
                    t.grad = None
                h, (c, n, m) = T.mlstm_chunkwise(*leaves)
                h.backward(dh)
                outs.append([h.detach().clone(), c, n, m] + [t.grad.clone() for t in leaves])
            same = all(torch.equal(a, b) for a, b in zip(*outs))
            print("fast launch bit-identical to triton's path:", same, flush=True)
            rows.append({"S": s, "fast_vs_triton_identical": same})
    set_fast(True)
    report = {"rows": rows, "fallbacks": {n: ln.fallback_reason for n, ln in launchers.items()},
              "fast_cache_sizes": {n: len(ln._cache) for n, ln in launchers.items()},
              "tuned": {n: {str(k_): str(c_) for k_, c_ in ln.cache.items()} for n, ln in launchers.items()}}
    print("fallbacks", report["fallbacks"], "cache sizes", report["fast_cache_sizes"], flush=True)
    for n, t in report["tuned"].items():
        print("tuned", n, t, flush=True)
    # where the host time goes: cProfile and the torch profiler, B1 S2k fwd+bwd (launch-bound)
    (q, k, v, i, f), _ = make_inputs(1, 2048 if not args.tiny else 64, torch.bfloat16, device, seed=5)
    leaves = [t.detach().requires_grad_() for t in (q, k, v, i, f)]
    fn = functools.partial(_forward_backward, kern["fastxlstm"], leaves, torch.randn_like(v))
    for fast in (False, True):
        set_fast(fast)
        fn()
        torch.cuda.synchronize()
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        pr.disable()
        buf = io.StringIO()
        pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(22)
        report[f"cprofile_fast{int(fast)}"] = buf.getvalue()
        print(f"cProfile fast={fast} (20 calls)\n" + "\n".join(buf.getvalue().splitlines()[:40]), flush=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    tab = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=40)
    report["profiler"] = tab
    print(tab, flush=True)
    return report


def fp32_study(args, device) -> dict:
    """fp32 inputs: our h error next to the float32 reference's own (both vs float64, same inputs), on all
    tokens and on the 99% best-conditioned ones, for 3xTF32 and exact fp32 (ieee) dots; forward times."""
    from fastxlstm.ops import triton as T
    from fastxlstm.ops.triton import _common

    torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    seed = int(time.time()) % 100000
    tiny = dict(dqk=24, dv=40, nh=2) if args.tiny else {}
    cases = ((1, 8192, False), (1, 8192, False), (2, 2000, True)) if not args.tiny else ((1, 100, False),)
    for b, s, st in cases:
        (q, k, v, i, f), state = make_inputs(b, s, torch.float32, device, seed, st, **tiny)
        seed += 1
        h64 = mlstm_chunkwise_reference(*(t.double() for t in (q, k, v, i, f)),
                                        None if state is None else tuple(x.double() for x in state))[0]
        h32 = mlstm_chunkwise_reference(q, k, v, i, f, state)[0]
        e32 = (h32.double() - h64).norm(dim=-1).flatten()
        good = e32 <= e32.quantile(0.99)

        def rel_good(h, good=good, h64=h64):
            d = (h.double() - h64).reshape(-1, h64.shape[-1])[good]
            return (d.norm() / h64.reshape(-1, h64.shape[-1])[good].norm()).item()

        row = {"B": b, "S": s, "state": st, "ref32": rel(h32, h64), "ref32_best99": rel_good(h32)}
        for prec in ("tf32x3", "ieee"):
            _common.FP32_DOT = prec
            h = T.mlstm_chunkwise(q, k, v, i, f, state, **(dict(kernel_chunk=32) if args.tiny else {}))[0]
            row[prec] = rel(h, h64)
            row[prec + "_best99"] = rel_good(h)
            row[prec + "_fwd_ms"] = timeit(device, _forward_only, T.mlstm_chunkwise, (q, k, v, i, f, state))
        _common.FP32_DOT = "tf32x3"
        rows.append(row)
        print("fp32", {k_: (f"{v_:.3g}" if isinstance(v_, float) else v_) for k_, v_ in row.items()}, flush=True)
    return {"fp32": rows}


# ----------------------------------------------------------------------------------------- small-S sweep
#: (B, S) of the sweep: the 7B prefill shapes where the forward is latency-bound, and S >= 8k as the control
SWEEP_SHAPES = ((1, 2048), (1, 512), (1, 1024), (1, 4096), (2, 512), (4, 512), (8, 512), (1, 8192), (1, 32768))
#: shapes that also get the per-config rows (each state/output config of the autotune lists timed alone)
SWEEP_DETAIL = ((1, 2048), (8, 512), (1, 8192))
#: the autotune rows before the small-S rows were added (237763e; state kernel: BK BV num_warps num_stages,
#: output kernel: BLQ BV NVP num_warps num_stages)
LEGACY_STATES = ((64, 64, 4, 2), (64, 64, 8, 3), (64, 128, 8, 2), (64, 64, 4, 1))
LEGACY_OUT = ((64, 32, 1, 8, 2), (64, 64, 1, 8, 2), (64, 32, 2, 8, 2), (128, 64, 1, 8, 2), (64, 32, 1, 8, 1))


def _errors(h, state, ref) -> dict:
    hr, (cr, nr, mr) = ref
    return {"h": rel(h, hr), "C": rel(state[0], cr), "n": rel(state[1], nr), "m": rel(state[2], mr),
            "nan": bool(torch.isnan(h).any() or torch.isnan(state[0]).any())}


def _legacy(tiny: bool):
    """A (re-enterable) patch of the forward's autotuned launchers by ones over the legacy rows."""
    from fastxlstm.ops.triton import _chunkwise, _common, _fwd

    st = ((16, 16, 4, 2),) if tiny else LEGACY_STATES
    out = ((16, 16, 2, 4, 2),) if tiny else LEGACY_OUT
    return mock.patch.multiple(
        _chunkwise,
        fwd_states=_common.tuned(_fwd.fwd_states_kernel, " ".join(_fwd.STATES_KEYS), interpret=(16, 16), rows=list(st)),
        fwd_out=_common.tuned(_fwd.fwd_out_kernel, " ".join(_fwd.OUT_KEYS), interpret=(16, 16, 2), rows=list(out)))


def sweep(args, device) -> dict:
    """Forward at small S (latency-bound), the public op ``mlstm_chunkwise`` (bf16, autotuned, default chunk)
    with the legacy autotune rows and with the current ones, each as one CUDA graph of 20 calls (GPU time per
    call), errors vs the float64 reference (fresh inputs; S <= 8k) or between the two (larger S). At the
    SWEEP_DETAIL shapes also every row of the current state and output lists alone (their errors and times)."""
    import triton

    from fastxlstm.ops import triton as T
    from fastxlstm.ops.triton import _chunkwise as CW
    from fastxlstm.ops.triton import _common, _fwd

    tiny = args.tiny
    shapes = ((1, 64), (2, 48)) if tiny else SWEEP_SHAPES
    detail = shapes if tiny else SWEEP_DETAIL
    dims = dict(dqk=24, dv=40, nh=2) if tiny else {}
    kc = dict(kernel_chunk=16) if tiny else {}
    chunk = 16 if tiny else CW.kernel_chunk_for(4096, None)
    st_cfgs = _fwd.fwd_states._launcher.configs if not tiny else [
        triton.Config({"BK": 16, "BV": bv}, num_warps=4, num_stages=2) for bv in (16, 32)]
    out_cfgs = _fwd.fwd_out._launcher.configs if not tiny else [
        triton.Config({"BLQ": 16, "BV": 16, "NVP": p}, num_warps=4, num_stages=2) for p in (1, 3)]
    # the rows the autotuner would consider for bf16 inputs (the single-stage output row is fp32-only: a bf16
    # launch of it faults, see _common._fits)
    fits = {"L": chunk, "Q": torch.empty(0, dtype=torch.float32 if tiny else torch.bfloat16)}
    st_rows = [tuple(c.kwargs[k_] for k_ in _fwd.STATES_KEYS) + (c.num_warps, c.num_stages) for c in st_cfgs]
    out_rows = [tuple(c.kwargs[k_] for k_ in _fwd.OUT_KEYS) + (c.num_warps, c.num_stages) for c in out_cfgs
                if _common._fits(c, fits)]
    # GPU: a CUDA graph of 20 calls (in-graph launch gaps, as in the engine's prefill graph), ms per call
    timer = functools.partial(_graph_ms, calls=20, rep=60) if device.type == "cuda" else functools.partial(
        timeit, device)
    legacy = _legacy(tiny)
    dtype = torch.float32 if tiny else torch.bfloat16
    seed = int(time.time()) % 100000
    res: dict = {"rows": [], "compare": [], "states_rows": st_rows, "out_rows": out_rows}
    for b, s in shapes:
        (q, k, v, i, f), _ = make_inputs(b, s, dtype, device, seed, **dims)
        seed += 1
        ref = None
        if b * s <= 8192:
            ref = mlstm_chunkwise_reference(*(t.double() for t in (q, k, v, i, f)), None, chunk_size=64)
        op = functools.partial(_forward_only, functools.partial(T.mlstm_chunkwise, **kc), (q, k, v, i, f))
        cmp: dict = {"B": b, "S": s, "dtype": str(dtype).split(".")[-1]}
        outs = {}
        for name, patch in (("legacy", legacy), ("new", contextlib.nullcontext())):
            with patch:
                cmp[f"{name}_ms"] = timer(op)
                outs[name] = op()
            if ref is not None:
                cmp[name + "_err"] = _errors(outs[name][0], outs[name][1], ref)
        cmp["new_vs_legacy_h"] = rel(outs["new"][0], outs["legacy"][0])
        cmp["speedup"] = cmp["legacy_ms"] / cmp["new_ms"]
        if not tiny:
            tk = CW._tune_key(b * NH, s)
            cmp["tuned"] = {name: {str(k_): str(c_) for k_, c_ in getattr(_fwd, name).cache.items() if tk in k_}
                            for name in ("fwd_states", "fwd_out")}
        res["compare"].append(cmp)
        print("compare", json.dumps(cmp), flush=True)
        if (b, s) in detail:
            bh, dqk, dv = b * q.shape[1], q.shape[-1], v.shape[-1]
            q3, k3, v3 = q.reshape(bh, s, dqk), k.reshape(bh, s, dqk), v.reshape(bh, s, dv)
            i2, f2 = i.reshape(bh, s).contiguous(), f.reshape(bh, s).contiguous()
            base = CW.Plan(st_rows[0], out_rows[0])
            bufs = CW.forward(q3, k3, v3, i2, f2, None, None, None, 1e-6, chunk, plan=base)
            for kind, rows in (("states", st_rows), ("out", out_rows)):
                for cfg in rows:
                    plan = CW.Plan(cfg, base.out) if kind == "states" else CW.Plan(base.states, cfg)
                    row = {"B": b, "S": s, "L": chunk, "kernel": kind, "cfg": list(cfg)}
                    try:
                        poison(device)
                        o = CW.forward(q3, k3, v3, i2, f2, None, None, None, 1e-6, chunk, plan=plan)
                        if ref is not None:
                            row.update(_errors(o["h"].view(q.shape[:3] + (dv,)),
                                               (o["cn"].view(b, -1, dqk, dv), o["nn"].view(b, -1, dqk),
                                                o["mn"].view(b, -1)), ref))
                        if kind == "states":
                            fn = functools.partial(CW._states, k3, v3, bufs, None, None, None, chunk, {}, plan)
                        else:
                            fn = functools.partial(CW.outputs, q3, k3, v3, i2, dict(bufs), 1e-6, chunk, plan)
                        row["ms"] = timer(fn)
                    except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory: recorded, skipped
                        row["error"] = repr(exc)[:200]
                    res["rows"].append(row)
                    print("sweep", json.dumps(row), flush=True)
        del q, k, v, i, f, ref, outs
        torch.cuda.empty_cache() if device.type == "cuda" else None
    print(sweep_table(res))
    return res


def sweep_table(res: dict) -> str:
    lines = ["| B | S | legacy ms | new ms | speedup | h err legacy / new (vs f64) | new vs legacy h |",
             "|---|---|---|---|---|---|---|"]
    for c in res["compare"]:
        errs = (f"{c['legacy_err']['h']:.2e} / {c['new_err']['h']:.2e}" if "new_err" in c else "-")
        lines.append(f"| {c['B']} | {c['S']} | {c['legacy_ms']:.4f} | {c['new_ms']:.4f} | {c['speedup']:.3f}x | "
                     f"{errs} | {c['new_vs_legacy_h']:.2e} |")
    for kind in ("states", "out"):
        for r in res["rows"]:
            if r["kernel"] == kind:
                lines.append(f"{kind} B{r['B']} S{r['S']} {r['cfg']}: "
                             + (f"{1e3 * r['ms']:.1f} us" if "ms" in r else r.get("error", "")[:60])
                             + (f" h {r['h']:.2e} C {r['C']:.2e}" if "h" in r else ""))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- output
def table(res: dict) -> str:
    lines = ["| B | S | impl | fwd ms | fwd floor ms | fwd+bwd ms | fwd+bwd floor ms | fwd vs xl_chunk | "
             "fwd+bwd vs xl_chunk | GPU-only (graph) fwd / fwd+bwd ms |", "|---|---|---|---|---|---|---|---|---|---|"]
    rows = res.get("chunkwise", []) + res.get("sdpa", [])
    ref = {(r["B"], r["S"]): r for r in rows if r["impl"] == "triton_xl_chunk" and "fwd_ms" in r}
    for r in sorted(rows, key=lambda r: (r["B"], r["S"], r["impl"])):
        x = ref.get((r["B"], r["S"]))

        def ratio(key, r=r, x=x):
            return f"{x[key] / r[key]:.2f}x" if x and key in r and key in x else "-"

        def ms(key, r=r):
            return f"{r[key]:.3f}" if key in r else r.get("error", "-")[:40]
        lines.append(f"| {r['B']} | {r['S']} | {r['impl']} | {ms('fwd_ms')} | {r['floor_fwd']['floor_ms']:.3f} | "
                     f"{ms('fwdbwd_ms')} | {r['floor_fwdbwd']['floor_ms']:.3f} | {ratio('fwd_ms')} | "
                     f"{ratio('fwdbwd_ms')} | {ms('graph_fwd_ms') if 'graph_fwd_ms' in r else '-'} / "
                     f"{ms('graph_fwdbwd_ms') if 'graph_fwdbwd_ms' in r else '-'} |")
    if res.get("decode"):
        lines += ["", "| B | 32-layer step, ms | official triton step, ms | state floor ms | share of a 7B step |",
                  "|---|---|---|---|---|"]
        for r in res["decode"]:
            off = f"{r['official_triton_step_ms']:.4f}" if "official_triton_step_ms" in r else "-"
            lines.append(f"| {r['B']} | {r['fastxlstm_ms']:.4f} | {off} | {r['floor_ms']:.4f} | "
                         f"{100 * r['share_of_step']:.1f}% |")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001
        return
    rows = res.get("chunkwise", []) + res.get("sdpa", [])
    batches = sorted({r["B"] for r in rows})
    fig, axes = plt.subplots(len(batches), 2, figsize=(11, 4 * len(batches)), squeeze=False)
    for bi, b in enumerate(batches):
        for ci, key in enumerate(("fwd_ms", "fwdbwd_ms")):
            ax = axes[bi][ci]
            for impl in sorted({r["impl"] for r in rows}):
                pts = sorted((r["S"], r[key]) for r in rows if r["impl"] == impl and r["B"] == b and key in r)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=impl)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length")
            ax.set_ylabel("ms")
            ax.set_title(f"B={b} {'forward' if ci == 0 else 'forward+backward'}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def rebuild_from_log(log: Path, out: Path, decode_json: str | None) -> None:
    """Rows of a --bench log ("chunkwise {...}", "sdpa {...}", "ceilings {...}") back into the JSON/table/plot."""
    import ast

    res: dict = {"chunkwise": [], "sdpa": [], "decode": []}
    for line in log.read_text().splitlines():
        head, _, body = line.partition(" ")
        if head in ("chunkwise", "sdpa", "ceilings", "decode") and body.startswith("{"):
            row = ast.literal_eval(body)
            if head == "ceilings":
                res["ceilings"] = row
            else:
                res[head].append(row)
        elif line.startswith("{'date'"):
            res["meta"] = ast.literal_eval(line)
    ceil = res["ceilings"]
    for row in res["chunkwise"]:
        row["floor_fwd"] = mlstm_floor(row["B"], row["S"], False, ceil)
        row["floor_fwdbwd"] = mlstm_floor(row["B"], row["S"], True, ceil)
    for row in res["sdpa"]:
        row["floor_fwd"] = sdpa_floor(row["B"], row["S"], False, ceil)
        row["floor_fwdbwd"] = sdpa_floor(row["B"], row["S"], True, ceil)
    if decode_json and not res["decode"]:
        res["decode"] = json.loads(Path(decode_json).read_text())["decode"]
        res["decode_source"] = decode_json
    res["rebuilt_from_log"] = log.name
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels.json").write_text(json.dumps(res, indent=1))
    md = table(res)
    (out / "kernels.md").write_text(md + "\n")
    plot(res, out / "kernels.png")
    print(md)


# ---------------------------------------------------------------------------------------- layout
def _legacy_mlstm_seq(self, lw, y, b, s, state, real=None):
    """``Runner._mlstm_seq`` before the in-place reads: at batch 1, q, k, v copied head-major first."""
    import torch.nn.functional as F

    from fastxlstm.engine import kernels as K
    from fastxlstm.ops import mlstm_chunkwise

    cfg = self.config
    proj = F.linear(y, lw.w_in)
    q, k, v, o, g = proj.split(self.splits, dim=-1)
    i, f = K.gates(g, self.nh, cfg.gate_soft_cap, real, bias=lw.gate_bias, seq=s)
    if b != 1:
        raise ValueError("the legacy path is batch 1 only")
    q, k, v = (K.heads_major(t, self.nh)[None] for t in (q, k, v))
    h, state = mlstm_chunkwise(q, k, v, i, f, state, chunk_size=cfg.chunk_size, backend=self.backend, eps=cfg.eps)
    h = h.transpose(1, 2).reshape(b * s, self.nh, self.dv)
    return K.mhnorm_ogate(h, o, lw.mh_norm, cfg.norm_eps), state


def _events_ms(fn, reps: int) -> float:
    """Median ms of ``fn()`` by CUDA events (wall time on the host elsewhere), after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def _agreement(xs, ys) -> dict:
    """Whether two paths' outputs are bitwise equal, and their largest difference relative to ``xs``."""
    return {"bitwise": all(torch.equal(x, y) for x, y in zip(xs, ys)),
            "max_rel": max(rel(y, x) for x, y in zip(xs, ys))}


def layout(args, device) -> dict:
    """The 7B prefill's mLSTM input layout, before/after in one process: (1) one layer's cell, q/k/v
    copied head-major (``K.heads_major`` x3, the old batch-1 path) + the kernels vs the kernels reading the
    views into the fused projection; (2) ``Runner.forward_tokens`` with the legacy ``_mlstm_seq`` patched
    in vs the current one (random 7B weights). Outputs of both paths are compared (bitwise / relative)."""
    from fastxlstm.config import preset
    from fastxlstm.engine import kernels as K
    from fastxlstm.engine.runner import Runner
    from fastxlstm.ops import triton as T

    tiny = args.tiny
    nh, dqk, dv = (2, 16, 32) if tiny else (NH, DQK, DV)
    dtype = torch.float32 if tiny else torch.bfloat16
    width = 2 * nh * (dqk + dv + 1)
    res: dict = {"cell": [], "model": []}
    for s in ((45, 100) if tiny else (2048, 32768)):
        g = torch.Generator(device="cpu").manual_seed(s)
        proj = torch.randn(s, width, generator=g).to(device, dtype)
        i = (15 * torch.tanh((torch.randn(1, nh, s, generator=g) * 4 - 3) / 15)).to(device)
        f = (15 * torch.tanh((torch.randn(1, nh, s, generator=g) * 3 + 4) / 15)).to(device)
        cols = (proj[:, :nh * dqk], proj[:, nh * dqk:2 * nh * dqk], proj[:, 2 * nh * dqk:2 * nh * dqk + nh * dv])

        def old(cols=cols, i=i, f=f):
            return T.mlstm_chunkwise(*(K.heads_major(t, nh)[None] for t in cols), i, f)

        def new(cols=cols, i=i, f=f, s=s):
            return T.mlstm_chunkwise(*(t.view(s, nh, -1).transpose(0, 1)[None] for t in cols), i, f)

        copies = [K.heads_major(t, nh)[None] for t in cols]

        def kernels_only(copies=copies, i=i, f=f):
            return T.mlstm_chunkwise(*copies, i, f)

        def copies_only(cols=cols):
            return [K.heads_major(t, nh) for t in cols]

        reps = 3 if tiny else 20
        with torch.no_grad():
            a, b = old(), new()
            outs_a, outs_b = [a[0], *a[1]], [b[0], *b[1]]
            row = {"S": s, **_agreement(outs_a, outs_b),
                   "old_ms": _events_ms(old, reps), "new_ms": _events_ms(new, reps),
                   "copies_ms": _events_ms(copies_only, reps), "kernels_contiguous_ms": _events_ms(kernels_only, reps),
                   "old2_ms": _events_ms(old, reps), "new2_ms": _events_ms(new, reps)}
        res["cell"].append(row)
        print(f"[layout cell] S={s}: copies+kernels {row['old_ms']:.3f} / {row['old2_ms']:.3f} ms "
              f"(copies {row['copies_ms']:.3f}, kernels on the copies {row['kernels_contiguous_ms']:.3f}), "
              f"in place {row['new_ms']:.3f} / {row['new2_ms']:.3f} ms, bitwise {row['bitwise']} "
              f"(max rel {row['max_rel']:.1e})", flush=True)
        del proj, i, f, cols, old, new, copies, kernels_only, copies_only
    if tiny:
        from fastxlstm.model import build_model

        model = build_model(preset("xlstm-tiny"), device, dtype, 0)
        seqs, reps = (40,), 1
    else:
        from fastxlstm.bench.common import random_xlstm

        model = random_xlstm(preset("xlstm-7b", weight_mode="fused"), device, torch.bfloat16)
        seqs, reps = (2048, 32768), 3
    runner = Runner(model, backend="triton")
    current = Runner._mlstm_seq
    for s in seqs:
        ids = torch.randint(0, model.config.vocab_size, (1, s), generator=torch.Generator().manual_seed(s)).to(device)
        row = {"S": s}
        outs = {}
        for name, fn in (("old", _legacy_mlstm_seq), ("new", current), ("old2", _legacy_mlstm_seq), ("new2", current)):
            with mock.patch.object(Runner, "_mlstm_seq", fn):
                row[f"{name}_ms"] = _events_ms(functools.partial(runner.forward_tokens, ids), reps)
                outs[name] = runner.forward_tokens(ids)
        (ha, sa), (hb, sb) = outs["old"], outs["new"]
        flat_a = [ha, *(t for st in sa for t in st)]
        flat_b = [hb, *(t for st in sb for t in st)]
        row.update(_agreement(flat_a, flat_b))
        res["model"].append(row)
        print(f"[layout model] forward_tokens S={s}: legacy {row['old_ms']:.2f} / {row['old2_ms']:.2f} ms, "
              f"in place {row['new_ms']:.2f} / {row['new2_ms']:.2f} ms, bitwise {row['bitwise']} "
              f"(max rel {row['max_rel']:.1e})", flush=True)
        del outs, ha, hb, sa, sb, flat_a, flat_b
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--diag", action="store_true", help="host vs GPU time at small sizes (launch overhead)")
    ap.add_argument("--fp32", action="store_true", help="fp32 accuracy vs the float32 reference's own error")
    ap.add_argument("--sweep", action="store_true", help="small-S forward: old vs current autotune rows")
    ap.add_argument("--layout", action="store_true", help="7B prefill: q/k/v in place vs head-major copies")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU interpreter dry run)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--tag", default="")
    ap.add_argument("--from-log", default=None, help="rebuild the JSON/table/plot of a --bench run from its log "
                    "(for a run that stopped early)")
    ap.add_argument("--decode-json", default=None, help="with --from-log: take the decode rows from this JSON")
    args = ap.parse_args()
    if args.from_log:
        rebuild_from_log(Path(args.from_log), Path(args.out), args.decode_json)
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import triton

    meta = {"date": datetime.date.today().isoformat(), "command": "python " + " ".join(sys.argv),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
            "torch": torch.__version__, "triton": triton.__version__,
            "autotune": os.environ.get("FASTXLSTM_TRITON_AUTOTUNE", "1")}
    try:
        import importlib.metadata as im

        meta["mlstm_kernels"] = im.version("mlstm_kernels")
    except Exception:  # noqa: BLE001
        meta["mlstm_kernels"] = None
    print(meta, flush=True)
    tag = f"_{args.tag}" if args.tag else ""
    modes = (("check", check), ("diag", diag), ("fp32", fp32_study), ("sweep", sweep), ("layout", layout))
    for name, fn in modes:  # each mode: its results, with meta and seconds, as kernels_<mode><tag>.json
        if getattr(args, name):
            t = time.time()
            res = {"meta": meta, **fn(args, device)}
            res["seconds"] = time.time() - t
            (out / f"kernels_{name}{tag}.json").write_text(json.dumps(res, indent=1))
    if args.bench:
        t = time.time()
        res = {"meta": meta, **bench(args, device)}
        res["seconds"] = time.time() - t
        name = "kernels_quick" if args.quick else "kernels"
        (out / f"{name}{tag}.json").write_text(json.dumps(res, indent=1))
        md = table(res)
        (out / f"{name}{tag}.md").write_text(md + "\n")
        plot(res, out / f"{name}{tag}.png")
        print(md)


if __name__ == "__main__":
    main()
