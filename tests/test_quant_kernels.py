"""CPU: the quantized Triton kernels under the interpreter (float32 activations) against float64
references: the weight-only matmul for decode batches (int8 and FP8 weights; the interpreter loads
float8_e4m3fn), the batch-1 GEMV with a quantized weight and its fused prologues / epilogues, and the
engine's batch-1 GEMV decode on a quantized model against the model's own forward. The interpreter
runs in ONE subprocess (this file as a script), so ``TRITON_INTERPRET`` never leaks into the tests."""

from __future__ import annotations

import json

import pytest
import torch


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _worker() -> dict:
    from fastxlstm.engine.gemv import gemv
    from fastxlstm.ops.quant import dequantize, quantize_weight
    from fastxlstm.ops.triton._quant import wo_matmul

    g = torch.Generator().manual_seed(0)
    out: dict = {"wo": {}, "gemv": {}}
    for scheme in ("int8", "fp8"):
        for m, n, k in ((1, 50, 40), (5, 37, 96), (16, 64, 72), (19, 33, 48)):
            q = quantize_weight(torch.randn(n, k, generator=g), scheme)
            x = torch.randn(m, k, generator=g)
            want = x.double() @ dequantize(q, torch.float64).T
            out["wo"][f"{scheme}_{m}x{n}x{k}"] = _rel(wo_matmul(x, q.data, q.scale), want)
        n, k = 45, 64
        q = quantize_weight(torch.randn(n, k, generator=g), scheme)
        wd = dequantize(q, torch.float64)
        x, nw = torch.randn(1, k, generator=g), torch.randn(k, generator=g)
        xn = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * nw.double()
        gu = torch.randn(1, 2 * k, generator=g)
        act = torch.nn.functional.silu(gu[:, :k].double()) * gu[:, k:].double()
        r = torch.randn(1, n, generator=g)
        r_out = gemv(gu, q, prologue="silu_mul", epilogue="residual", residual=r.clone())
        out["gemv"][scheme] = {
            "none": _rel(gemv(x, q), x.double() @ wd.T),
            "rmsnorm": _rel(gemv(x, q, prologue="rmsnorm", norm_weight=nw), xn @ wd.T),
            "silu_mul_residual": _rel(r_out, r.double() + act @ wd.T),
            "softcap": _rel(gemv(x, q, epilogue="softcap", cap=3.0), 3.0 * torch.tanh(x.double() @ wd.T / 3.0)),
        }
    out["engine"] = _engine_case()
    out["act_quant"] = _act_quant_case()
    return out


def _act_quant_case() -> dict:
    """The one-launch per-row FP8 activation quantization against the torch definition. The interpreter's
    own float32 -> e4m3 cast halves values that round up to the next power of two (125.8 -> 64 instead
    of 128); those elements are counted apart (the GPU test compares every element bitwise)."""
    from fastxlstm.ops.quant import quantize_rows_fp8 as reference
    from fastxlstm.ops.triton._quant import quantize_rows_fp8

    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, 100, generator=g) * torch.rand(7, 1, generator=g) * 30
    x[2] = 0.0
    q, s = quantize_rows_fp8(x)
    q0, s0 = reference(x)
    a, b = q.float(), q0.float()
    quirk = (a != b) & (b.abs() == 2 * a.abs()) & (torch.log2(b.abs()) % 1 == 0)
    return {"scales_equal": bool(torch.equal(s, s0)), "other_elements_equal": bool(torch.equal(a[~quirk], b[~quirk])),
            "quirk_elements": int(quirk.sum()), "shape": list(q.shape), "dtype": str(q.dtype)}


def _engine_case() -> dict:
    """Batch-1 decode (the GEMV path with quantized weights, LM head included) against the quantized
    model's own forward: logits and greedy tokens over 4 steps."""
    from fastxlstm.config import XLSTMConfig
    from fastxlstm.engine import Engine
    from fastxlstm.model.quant import quantize_model
    from tests.helpers import perturbed_model

    cfg = XLSTMConfig(vocab_size=259, embedding_dim=64, num_blocks=2, num_heads=2, weight_mode="fused")
    out = {}
    for scheme in ("int8", "fp8"):
        model = quantize_model(perturbed_model(cfg, seed=3), scheme, lm_head=True)
        eng = Engine(model, max_slots=1, backend="triton")
        prompt = list(range(3, 30))
        eng.sample([0], eng.prefill_into_slots([eng.allocate_slot()], [prompt]))
        steps = [eng.decode_step(return_logits=True) for _ in range(4)]
        errs, same = [], True
        with torch.no_grad():
            lg, st = model(torch.tensor([prompt]))
            t = lg[0, -1].argmax()
            for s in steps:
                lg, st = model(t.view(1, 1), st)
                errs.append((lg[0, -1] - s.logits[0]).abs().max().item())
                t = lg[0, -1].argmax()
                same &= bool(t == s.tokens[0])
        out[scheme] = {"gemv_path": bool(eng.runner.gemv_decode), "max_abs": max(errs), "same_tokens": same}
    return out


@pytest.fixture(scope="module")
def interp() -> dict:
    from tests.helpers import run_interpreter_worker

    return run_interpreter_worker(__file__)


def test_weight_only_matmul_matches_float64(interp):
    for case, err in interp["wo"].items():
        assert err < 1e-6, (case, err)


def test_quantized_gemv_prologues_epilogues_match_float64(interp):
    for scheme, r in interp["gemv"].items():
        for name, err in r.items():
            assert err < 1e-6, (scheme, name, err)


def test_engine_gemv_decode_on_quantized_model_matches_its_forward(interp):
    for scheme, r in interp["engine"].items():
        assert r["gemv_path"] and r["same_tokens"], scheme
        assert r["max_abs"] < 1e-4, (scheme, r)


def test_fp8_activation_quantization_kernel(interp):
    r = interp["act_quant"]
    assert r["scales_equal"] and r["other_elements_equal"], r
    assert r["quirk_elements"] < 20 and r["shape"] == [7, 100] and r["dtype"] == "torch.float8_e4m3fn", r


if __name__ == "__main__":  # the interpreter worker (TRITON_INTERPRET=1 set by the fixture)
    print(json.dumps(_worker()))
