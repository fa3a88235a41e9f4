"""Decode/prefill profiling of the engine on the GPU (7B shapes, random weights):
``python -m fastxlstm.bench.decode_profile OUT_JSON [--quick]``.

Measures, in one process: the step kernel's achieved state bandwidth per tile config at several
batch sizes (float32 and bf16 ``C``), the batch-1 GEMVs against cuBLAS per projection shape, the
engine's decode step per variant (unfused kernels / fused cell / fused cell + GEMVs; float32 vs
bf16 state), and per-kernel time tables (torch.profiler) of a batch-1 decode step and a 2k prefill.
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict

import torch
import torch.nn.functional as F

from .common import device_name, graph_equals_eager, random_xlstm


def _graph_ms(fn, iters: int = 20, warmup: int = 2) -> float:
    from ..engine.engine import capture_graph

    g, _ = capture_graph(fn, warmup=warmup)
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        g.replay()
    b.record()
    torch.cuda.synchronize()
    del g
    return a.elapsed_time(b) / iters


def _kernel_table(fn, top: int = 18) -> dict:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    per = defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            key = ev.name[:90]
            per[key][0] += 1
            per[key][1] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
    rows = sorted(per.items(), key=lambda kv: -kv[1][1])
    total = sum(v[1] for v in per.values())
    return {"total_us": total, "kernels": sum(v[0] for v in per.values()),
            "top": [{"name": k, "count": c, "us": round(t, 1)} for k, (c, t) in rows[:top]]}


def step_sweep(out: dict, batches, quick: bool) -> None:
    from ..ops.triton import _step

    nh, dqk, dv, layers = 8, 256, 512, 32
    configs = [None, (16, 256, 4), (16, 64, 4), (32, 64, 4), (64, 64, 4), (64, 32, 4), (128, 32, 4), (128, 32, 8),
               (128, 64, 8), (256, 16, 4), (256, 32, 8), (64, 256, 8), (128, 256, 8)]
    res = []
    for b in batches:
        bh = b * nh
        for cdt in (torch.float32, torch.bfloat16):
            nl = layers if b <= 8 else max(1, 32 // b * 4)  # >= ~0.5 GB per launch set, beyond L2
            c = [torch.randn(b, nh, dqk, dv, device="cuda").to(cdt) * 0.1 for _ in range(nl)]
            n = [torch.randn(b, nh, dqk, device="cuda") for _ in range(nl)]
            m = [torch.zeros(b, nh, device="cuda") for _ in range(nl)]
            p = 2 * nh * (dqk + dv + 1)
            proj = torch.randn(b, p, device="cuda", dtype=torch.bfloat16)
            gb = torch.zeros(2 * nh, device="cuda")
            gb[nh:] = 5.0
            w = torch.ones(nh * dv, device="cuda", dtype=torch.bfloat16)
            y = torch.empty(b, nh * dv, device="cuda", dtype=torch.bfloat16)
            bytes_ = nl * 2 * (c[0].numel() * c[0].element_size() + n[0].numel() * 4 + m[0].numel() * 4)
            from ..ops.triton import mlstm_decode_cell_

            for cfg in configs:
                if cfg is not None and (cfg[0] > dv or (b >= 32 and cfg[0] < 32)):
                    continue
                _step.STEP_CONFIG = cfg
                chosen = _step.step_config(bh, dqk, dv)

                def run(c=c, n=n, m=m, proj=proj, gb=gb, w=w, y=y, nl=nl):
                    for j in range(nl):
                        mlstm_decode_cell_(proj, gb, None, c[j], n[j], m[j], w, y, num_heads=nh, cap=15.0)
                try:
                    ms = _graph_ms(run, iters=10)
                except Exception as e:  # noqa: BLE001
                    res.append({"batch": b, "c_dtype": str(cdt), "config": chosen, "error": str(e)[:200]})
                    continue
                res.append({"batch": b, "c_dtype": str(cdt), "config": list(chosen), "default": cfg is None,
                            "ms_per_layer": ms / nl, "tb_s": bytes_ / (ms * 1e-3) / 1e12})
            _step.STEP_CONFIG = None
            del c, n, m
            torch.cuda.empty_cache()
            if quick:
                break
    out["step_sweep"] = res


def gemv_sweep(out: dict, model, only: tuple[str, ...] = ()) -> dict:
    from ..engine.gemv import gemv
    from ..engine.weights import fuse_weights

    layers = fuse_weights(model)
    lm = model.lm_head.weight.detach()
    d = model.config.embedding_dim
    hid = model.config.ffn_dim
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(1, d, device=dev, dtype=dt)
    xv = torch.randn(1, model.config.v_dim, device=dev, dtype=dt)
    gu = torch.randn(1, 2 * hid, device=dev, dtype=dt)
    nw = torch.ones(d, device=dev, dtype=dt)
    res = torch.zeros(1, d, device=dev, dtype=dt)
    shapes = {
        "w_in": ([lw.w_in for lw in layers], lambda w, cfg: gemv(x, w, prologue="rmsnorm", norm_weight=nw, config=cfg),
                 lambda w: F.linear(x, w)),
        "w_out": ([lw.w_out for lw in layers], lambda w, cfg: gemv(xv, w, epilogue="residual", residual=res,
                                                                   config=cfg), lambda w: F.linear(xv, w)),
        "w_up": ([lw.w_up for lw in layers], lambda w, cfg: gemv(x, w, prologue="rmsnorm", norm_weight=nw, config=cfg),
                 lambda w: F.linear(x, w)),
        "w_down": ([lw.w_down for lw in layers], lambda w, cfg: gemv(gu, w, prologue="silu_mul", epilogue="residual",
                                                                     residual=res, config=cfg),
                   lambda w: F.linear(gu[:, :hid], w)),
        "lm_head": ([lm] * 4, lambda w, cfg: gemv(x, w, epilogue="softcap", cap=30.0, config=cfg),
                    lambda w: F.linear(x, w)),
    }
    configs = [None, (8, 512, 4, 4), (8, 256, 4, 5), (16, 256, 4, 4), (8, 512, 8, 3), (4, 512, 2, 3),
               (8, 512, 2, 3), (16, 512, 8, 3), (16, 512, 4, 4), (4, 1024, 4, 4)]
    table = {}
    best = {}
    for name, (ws, ours, ref) in shapes.items():
        if only and name not in only:
            continue
        nbytes = sum(w.numel() * w.element_size() for w in ws)
        row = {"shape": list(ws[0].shape)}
        ms = _graph_ms(lambda ws=ws, ref=ref: [ref(w) for w in ws])
        row["cublas_tb_s"] = nbytes / (ms * 1e-3) / 1e12
        row["cublas_us"] = ms * 1e3 / len(ws)
        cand = {}
        for cfg in configs:
            try:
                ms = _graph_ms(lambda ws=ws, ours=ours, cfg=cfg: [ours(w, cfg) for w in ws])
            except Exception as e:  # noqa: BLE001
                cand[str(cfg)] = str(e)[:120]
                continue
            cand[str(cfg)] = round(nbytes / (ms * 1e-3) / 1e12, 3)
        row["gemv_tb_s"] = cand
        ok = {k: v for k, v in cand.items() if isinstance(v, float)}
        if ok:
            k = max(ok, key=ok.get)
            row["best"] = [k, ok[k]]
            if k != "None":
                best[tuple(ws[0].shape)] = tuple(json.loads(k.replace("(", "[").replace(")", "]")))
        table[name] = row
    out["gemv_sweep"] = table
    return best


def decode_variants(out: dict, model, batches) -> None:
    """Decode step time per variant, with the shipped GEMV configs (gemv_config), as the benchmark runs."""
    from ..engine import Engine
    from ..sampling import SamplingParams
    from .common import seeded_tokens
    from .loops import decode_timing as _decode_timing

    vocab = model.config.vocab_size
    rows = []
    tables = {}
    for sdt in ("float32", "bfloat16"):
        eng = Engine(model, max_slots=max(batches), state_dtype=sdt)
        slot0 = eng.allocate_slot()
        logits = eng.prefill_into_slot(slot0, seeded_tokens(32, vocab)[0])
        for layer in eng.states:
            for buf in layer:
                buf.copy_(buf[0:1].clone().expand_as(buf))
        slots = [slot0] + [eng.allocate_slot() for _ in range(max(batches) - 1)]
        for s in slots:
            eng.configure_slot(s, SamplingParams(max_new_tokens=1 << 30, ignore_eos=True))
        eng.sample(slots, logits[None].expand(len(slots), -1).contiguous())
        variants = [("fused+gemv", True, True), ("fused", True, False)]
        if sdt == "float32":
            variants.append(("unfused", False, False))
        for b in batches:
            for name, fused, gv in variants:
                if gv and b != 1:
                    continue
                eng.runner.fused_cell, eng.runner.gemv_decode = fused, gv
                eng._graphs.clear()
                eng.decode_step(slots=list(range(b)), return_outputs=False)
                ms = _decode_timing(lambda eng=eng: eng.decode_step(return_outputs=False), 40 if b <= 32 else 16)
                rows.append({"state": sdt, "batch": b, "variant": name, "ms": ms, "tok_s": b * 1e3 / ms})
                print(f"[decode] {sdt} B{b} {name}: {ms:.3f} ms {b * 1e3 / ms:.0f} tok/s", flush=True)
                if b == 1 and sdt == "float32":
                    tables[name] = _kernel_table(lambda eng=eng: eng.decode_step(return_outputs=False))
        eng.runner.fused_cell, eng.runner.gemv_decode = True, True
        # graph vs eager greedy tokens (B1 gemv path and B4 fused), 12 steps from the same state
        for n in (1, 4):
            out.setdefault("graph_equals_eager", {})[f"{sdt}_B{n}"] = graph_equals_eager(eng, n, 12)
        del eng
        torch.cuda.empty_cache()
    out["decode"] = rows
    out["decode_kernels_b1"] = tables


def prefill_profile(out: dict, model) -> None:
    """2k prefill into a slot (ms, best of 3) with and without the prefill graph, and the per-kernel
    table of the eager forward (the graph replays the same kernels)."""
    from ..engine import Engine
    from .common import seeded_tokens

    eng = Engine(model, max_slots=1)
    s = eng.allocate_slot()
    ids = seeded_tokens(2048, model.config.vocab_size)[0]
    graphs = eng.runner.prefill_graphs
    for key, use in (("prefill_2k_ms_graph", graphs), ("prefill_2k_ms_eager", None)):
        eng.runner.prefill_graphs = use
        eng.prefill_into_slot(s, ids)
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            eng.prefill_into_slot(s, ids)
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        out[key] = best * 1e3
    print(f"[prefill] 2k into a slot: graph {out['prefill_2k_ms_graph']:.2f} ms, "
          f"eager {out['prefill_2k_ms_eager']:.2f} ms", flush=True)
    out["prefill_2k_kernels"] = _kernel_table(lambda: eng.prefill_into_slot(s, ids), top=25)


def prefill_diag(out: dict, model) -> None:
    """Where a 2k prefill's wall time goes: GPU time (events) vs host time to enqueue, and the
    host's hottest functions (cProfile) for one forward."""
    import cProfile
    import io
    import pstats

    from ..engine import Engine
    from .common import seeded_tokens

    eng = Engine(model, max_slots=1)
    ids = seeded_tokens(2048, model.config.vocab_size)
    runner = eng.runner
    runner.forward_tokens(ids)
    torch.cuda.synchronize()
    res = {}
    for rep in range(3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        a.record()
        hidden, _ = runner.forward_tokens(ids)
        t_enq = time.perf_counter() - t0
        b.record()
        torch.cuda.synchronize()
        res[rep] = {"wall_ms": (time.perf_counter() - t0) * 1e3, "enqueue_ms": t_enq * 1e3,
                    "gpu_ms": a.elapsed_time(b)}
    prof = cProfile.Profile()
    prof.enable()
    runner.forward_tokens(ids)
    torch.cuda.synchronize()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(18)
    out["prefill_diag"] = {"runs": res, "cprofile": buf.getvalue()[-6000:]}
    print("[prefill diag]", res, flush=True)
    print(buf.getvalue()[-3500:], flush=True)


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    path = args[0]
    quick = "--quick" in args
    out: dict = {"device": device_name(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}
    torch.backends.cuda.matmul.allow_tf32 = False

    def save():
        with open(path, "w") as fh:
            json.dump(out, fh, indent=1, default=str)

    from ..config import preset

    model = random_xlstm(preset("xlstm-7b", weight_mode="fused"), "cuda", torch.bfloat16)

    def gemvs():
        best = gemv_sweep(out, model, tuple(x for x in want if x.startswith("w_")))
        out["gemv_best"] = {str(k): v for k, v in best.items()}
        for name, row in out["gemv_sweep"].items():
            print(f"[gemv] {name} {row['shape']}: cublas {row['cublas_tb_s']:.2f} TB/s, best {row.get('best')}",
                  flush=True)

    def steps():
        step_sweep(out, (1, 8, 32, 128), quick)
        for r in out["step_sweep"]:
            if "error" not in r:
                print(f"[step] B{r['batch']} {r['c_dtype'][6:]} {r['config']}{' *' if r['default'] else ''}: "
                      f"{r['ms_per_layer'] * 1e3:.1f} us/layer {r['tb_s']:.2f} TB/s", flush=True)
            else:
                print(f"[step] B{r['batch']} {r['config']} ERROR {r['error']}", flush=True)

    want = next((a.split("=", 1)[1].split(",") for a in args if a.startswith("--sections=")),
                ["steps", "gemv", "decode", "prefill", "prefill_diag"])
    sections = (("steps", steps), ("gemv", gemvs), ("prefill_diag", lambda: prefill_diag(out, model)),
                ("decode", lambda: decode_variants(out, model, (1, 8, 32, 128))),
                ("prefill", lambda: prefill_profile(out, model)))
    for name, fn in sections:
        if name not in want:
            continue
        t = time.perf_counter()
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            import traceback

            out[f"{name}_error"] = traceback.format_exc()[-3000:]
            print(f"[{name}] ERROR {e}", out[f"{name}_error"][-800:], flush=True)
        out[f"{name}_s"] = time.perf_counter() - t
        print(f"[{name}] {out[f'{name}_s']:.0f} s", flush=True)
        save()
    print("[graph==eager]", out.get("graph_equals_eager"))
    for name, tab in out.get("decode_kernels_b1", {}).items():
        print(f"[b1 kernels] {name}: {tab['kernels']} kernels, {tab['total_us']:.0f} us")
        for r in tab["top"][:8]:
            print(f"    {r['count']:4d} {r['us']:9.1f} us  {r['name'][:70]}")
    if "prefill_2k_kernels" in out:
        tab = out["prefill_2k_kernels"]
        print(f"[prefill 2k] {out['prefill_2k_ms_graph']:.1f} ms wall (graph), kernels {tab['total_us'] / 1e3:.1f} ms")
        for r in tab["top"][:14]:
            print(f"    {r['count']:4d} {r['us'] / 1e3:8.2f} ms  {r['name'][:70]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
