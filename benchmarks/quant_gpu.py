"""Quantized projections on the GPU, 7B shapes, random weights: ``python benchmarks/quant_gpu.py OUT_JSON``.

1. Batch-1 GEMV tile configs for 1-byte (FP8) weights per projection (with the prologue / epilogue the
   engine uses), against the bf16 GEMV's shipped config: achieved weight bandwidth (32 distinct layers'
   weights in one CUDA graph, so nothing stays in L2).
2. The weight-only matmul's tile configs at batch 8, then per batch (2 ... 128) every way to run a
   projection: bf16 cuBLAS, the weight-only kernel (int8 / fp8), W8A8 ``torch._scaled_mm`` with the
   activation quantization, int8 dequantize + cuBLAS (microseconds per layer).
3. The prefill-size projection (4096 rows): bf16 cuBLAS vs W8A8 (and the activation quantization alone).
4. Decode step of the engine (CUDA graph) for bf16 / fp8 / int8 at batch 1 and 8 with the best configs.
"""

from __future__ import annotations

import json
import sys
import time

import torch
import torch.nn.functional as F

from fastxlstm.bench.common import device_name, random_xlstm
from fastxlstm.bench.decode_profile import _graph_ms
from fastxlstm.config import preset
from fastxlstm.engine import gemv as G
from fastxlstm.engine.weights import fuse_weights
from fastxlstm.ops import quant as Q
from fastxlstm.ops.triton import _quant as TQ


def _ms(fn) -> float | str:
    """CUDA-graph ms of ``fn``, or the error's text (one failing variant must not end the run)."""
    try:
        return _graph_ms(fn)
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {str(e)[:100]}"


def main(path: str) -> None:
    t0 = time.time()
    out: dict = {"device": device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                           time.gmtime())}
    cfg = preset("xlstm-7b", weight_mode="fused")
    model = random_xlstm(cfg, "cuda", torch.bfloat16)
    layers = fuse_weights(model)
    d, hid = cfg.embedding_dim, cfg.ffn_dim
    dev, dt = "cuda", torch.bfloat16
    mats = {"w_in": [lw.w_in for lw in layers], "w_out": [lw.w_out for lw in layers],
            "w_up": [lw.w_up for lw in layers], "w_down": [lw.w_down for lw in layers]}
    quant = {s: {k: [Q.quantize_weight(w, s) for w in ws] for k, ws in mats.items()} for s in ("fp8", "int8")}
    x = torch.randn(1, d, device=dev, dtype=dt)
    xv = torch.randn(1, cfg.v_dim, device=dev, dtype=dt)
    gu = torch.randn(1, 2 * hid, device=dev, dtype=dt)
    nw = torch.ones(d, device=dev, dtype=dt)
    res = torch.zeros(1, d, device=dev, dtype=dt)
    calls = {"w_in": lambda w, c: G.gemv(x, w, prologue="rmsnorm", norm_weight=nw, config=c),
             "w_out": lambda w, c: G.gemv(xv, w, epilogue="residual", residual=res, config=c),
             "w_up": lambda w, c: G.gemv(x, w, prologue="rmsnorm", norm_weight=nw, config=c),
             "w_down": lambda w, c: G.gemv(gu, w, prologue="silu_mul", epilogue="residual", residual=res, config=c)}
    gemv_cfgs = [None, (4, 1024, 4, 3), (8, 1024, 4, 3), (16, 1024, 8, 3), (4, 2048, 4, 3), (8, 2048, 8, 3)]
    sweep = {}
    for name, call in calls.items():
        nbytes = sum(w.numel() * w.element_size() for w in mats[name])
        row = {"shape": list(mats[name][0].shape),
               "bf16_tb_s": nbytes / (_graph_ms(lambda n=name, c=call: [c(w, None) for w in mats[n]]) * 1e-3) / 1e12}
        cand = {}
        for c in gemv_cfgs:
            try:
                ms = _graph_ms(lambda n=name, c=c, call=call: [call(w, c) for w in quant["fp8"][n]])
                cand[str(c)] = round(nbytes / 2 / (ms * 1e-3) / 1e12, 3)
            except Exception as e:  # noqa: BLE001
                cand[str(c)] = str(e)[:100]
        row["fp8_tb_s"] = cand
        ok = {k: v for k, v in cand.items() if isinstance(v, float)}
        row["best"] = max(ok, key=ok.get) if ok else None
        if row["best"] not in (None, "None"):
            G.CONFIGS_8BIT[tuple(row["shape"])] = tuple(json.loads(row["best"].replace("(", "[").replace(")", "]")))
        sweep[name] = row
        print(name, row["shape"], f"bf16 {row['bf16_tb_s']:.2f} TB/s", "fp8", row["best"], ok.get(row["best"]),
              flush=True)
    out["gemv_sweep"] = sweep
    out["gemv_configs_8bit"] = {str(k): v for k, v in G.CONFIGS_8BIT.items()}

    # weight-only matmul tile configs at batch 8
    wo_cfgs = [None, (16, 512, 4, 3), (32, 256, 4, 4), (32, 128, 4, 4), (64, 128, 4, 3), (16, 128, 4, 5)]
    wo = {}
    for name, ws in quant["fp8"].items():
        k = ws[0].shape[1]
        xb = torch.randn(8, k, device=dev, dtype=dt)
        nbytes = sum(w.data.numel() for w in ws)
        cand = {}
        for c in wo_cfgs:
            try:
                ms = _graph_ms(lambda ws=ws, c=c, xb=xb: [TQ.wo_matmul(xb, w.data, w.scale, config=c) for w in ws])
                cand[str(c)] = round(nbytes / (ms * 1e-3) / 1e12, 3)
            except Exception as e:  # noqa: BLE001
                cand[str(c)] = str(e)[:100]
        ok = {kk: v for kk, v in cand.items() if isinstance(v, float)}
        best = max(ok, key=ok.get) if ok else None
        if best not in (None, "None"):
            TQ.CONFIGS[tuple(ws[0].shape)] = tuple(json.loads(best.replace("(", "[").replace(")", "]")))
        wo[name] = {"shape": list(ws[0].shape), "tb_s": cand, "best": best}
        print("wo b8", name, best, ok.get(best), flush=True)
    out["wo_sweep"] = wo
    out["wo_configs"] = {str(k): v for k, v in TQ.CONFIGS.items()}

    # every way to run each projection, per batch (us per layer)
    ways = {}
    for name in mats:
        k = mats[name][0].shape[1]
        rows = {}
        for b in (2, 8, 16, 32, 128):
            xb = torch.randn(b, k, device=dev, dtype=dt)
            r = {"bf16_cublas": _ms(lambda n=name, xb=xb: [F.linear(xb, w) for w in mats[n]])}
            for sc in ("fp8", "int8"):
                qs = quant[sc][name]
                r[f"{sc}_wo"] = _ms(lambda qs=qs, xb=xb: [TQ.wo_matmul(xb, w.data, w.scale) for w in qs])
            r["fp8_w8a8"] = _ms(lambda n=name, xb=xb: [Q.fp8_linear_w8a8(xb, w) for w in quant["fp8"][n]])
            r["int8_dequant_cublas"] = _ms(lambda n=name, xb=xb: [F.linear(xb, Q.dequantize(w, dt))
                                                                  for w in quant["int8"][n]])
            rows[b] = {kk: (round(v * 1e3 / 32, 2) if isinstance(v, float) else v) for kk, v in r.items()}
        ways[name] = rows
        print("ways", name, {b: min((kk for kk in v if isinstance(v[kk], float)), key=v.get) for b, v in rows.items()},
              flush=True)
    out["ways_us_per_layer"] = ways

    # prefill-size projections: 4096 rows
    pre = {}
    for name in mats:
        k = mats[name][0].shape[1]
        xb = torch.randn(4096, k, device=dev, dtype=dt)
        w0, q0 = mats[name][0], quant["fp8"][name][0]
        pre[name] = {"bf16_cublas_ms": _ms(lambda xb=xb, w0=w0: F.linear(xb, w0)),
                     "fp8_w8a8_ms": _ms(lambda xb=xb, q0=q0: Q.fp8_linear_w8a8(xb, q0)),
                     "act_quant_ms": _ms(lambda xb=xb: Q.quantize_rows_fp8(xb))}
        print("prefill 4096", name, pre[name], flush=True)
    out["prefill_4096"] = pre
    quant = mats = layers = None
    torch.cuda.empty_cache()
    json.dump(out, open(path, "w"), indent=1)

    # decode step of the engine with these configs
    from fastxlstm.bench.common import Plan
    from fastxlstm.bench.loops import decode_timing as _decode_timing
    from fastxlstm.bench.systems import _decode_engine
    from fastxlstm.model.quant import quantize_model

    plan = Plan(decode_steps=32)
    dec = {}
    for scheme in ("bf16", "fp8", "int8"):
        m = random_xlstm(cfg, "cuda", torch.bfloat16) if scheme != "bf16" else model
        if scheme != "bf16":
            quantize_model(m, scheme)
        eng = _decode_engine(m, plan, cfg.vocab_size, 8, "float32")
        for b in (1, 8):
            eng.decode_step(slots=list(range(b)), return_outputs=False)
            ms = _decode_timing(lambda eng=eng: eng.decode_step(return_outputs=False), 32)
            dec[f"{scheme}_b{b}"] = {"ms": ms, "tok_s": b * 1e3 / ms}
        print("decode", scheme, {kk: round(v["tok_s"]) for kk, v in dec.items() if kk.startswith(scheme)},
              flush=True)
        eng = m = None
        model = None
        torch.cuda.empty_cache()
    out["decode"] = dec
    out["wall_s"] = time.time() - t0
    json.dump(out, open(path, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
