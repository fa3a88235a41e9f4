"""CPU: the engine's fused decode kernels (the one-launch mLSTM decode cell and the batch-1 GEMVs
with fused prologues / epilogues) under the Triton interpreter, float32, against PyTorch reference
ops; and the bf16 state store option. The interpreter runs in ONE subprocess (this file as a
script), so ``TRITON_INTERPRET`` never leaks into the test process."""

from __future__ import annotations

import json

import pytest
import torch


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _cell_case(batch: int, nh: int, dqk: int, dv: int, c_dtype: torch.dtype, seed: int) -> dict:
    from fastxlstm.ops.triton import mlstm_decode_cell_
    from tests.helpers import decode_cell_reference

    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(batch, 2 * nh * (dqk + dv + 1), generator=g)
    gb = torch.randn(2 * nh, generator=g)
    gb[nh:] += 3.0
    act = torch.arange(batch) % 3 != 1
    c = torch.randn(batch, nh, dqk, dv, generator=g) * 0.3
    n, m = torch.randn(batch, nh, dqk, generator=g), torch.randn(batch, nh, generator=g)
    w = 1 + 0.1 * torch.randn(nh * dv, generator=g)
    want, (c1, n1, m1) = decode_cell_reference(proj, gb, c, n, m, w)
    cs, ns, ms = c.to(c_dtype), n.clone(), m.clone()
    c0 = cs.clone()
    y = torch.empty(batch, nh * dv)
    mlstm_decode_cell_(proj, gb, act, cs, ns, ms, w, y, num_heads=nh, cap=15.0)
    return {"y": _rel(y[act], want[act]), "C": _rel(cs[act], c1[act]), "n": _rel(ns[act], n1[act]),
            "m": _rel(ms[act], m1[act]),
            "inactive_same": bool(torch.equal(cs[~act], c0[~act]) and torch.equal(ns[~act], n[~act])
                                  and torch.equal(ms[~act], m[~act]))}


def _gemv_cases() -> dict:
    import torch.nn.functional as F

    from fastxlstm.engine.gemv import gemv

    g = torch.Generator().manual_seed(3)
    out = {}
    for n, k in ((50, 40), (37, 96)):
        x, w = torch.randn(1, k, generator=g), torch.randn(n, k, generator=g)
        nw = torch.randn(k, generator=g)
        xn = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * nw
        gu = torch.randn(1, 2 * k, generator=g)
        r = torch.randn(1, n, generator=g)
        r_in = r.clone()
        gemv(gu, w, prologue="silu_mul", epilogue="residual", residual=r_in)
        out[f"{n}x{k}"] = {
            "none": _rel(gemv(x, w), x @ w.T),
            "rmsnorm": _rel(gemv(x, w, prologue="rmsnorm", norm_weight=nw), xn @ w.T),
            "silu_mul_residual": _rel(r_in, r + (F.silu(gu[:, :k]) * gu[:, k:]) @ w.T),
            "rmsnorm_softcap": _rel(gemv(x, w, prologue="rmsnorm", norm_weight=nw, epilogue="softcap", cap=3.0),
                                    3 * torch.tanh(xn @ w.T / 3)),
        }
    return out


def _engine_case() -> dict:
    """Batch-1 decode (GEMV path + fused cell) and batch-3 decode (fused cell) against the model."""
    from fastxlstm.config import XLSTMConfig
    from fastxlstm.engine import Engine
    from tests.helpers import perturbed_model

    cfg = XLSTMConfig(vocab_size=300, embedding_dim=64, num_blocks=2, num_heads=2, weight_mode="fused")
    ref = perturbed_model(cfg)
    out = {}
    for slots, ids in ((1, [list(range(3, 20))]), (3, [[5, 6, 7, 8], list(range(40, 50)), [9]])):
        eng = Engine(perturbed_model(cfg), max_slots=slots, backend="triton")
        out[f"b{slots}_paths"] = [eng.runner.step_name, eng.runner.fused_cell, eng.runner.gemv_decode]
        got = eng.prefill_into_slots([eng.allocate_slot() for _ in ids], ids)
        eng.sample(list(range(len(ids))), got)
        steps = [eng.decode_step(return_logits=True) for _ in range(3)]
        errs, same = [], True
        with torch.no_grad():
            for j, p in enumerate(ids):
                lg, st = ref(torch.tensor([p]))
                t = lg[0, -1].argmax()
                for s in steps:
                    lg, st = ref(t.view(1, 1), st)
                    errs.append((lg[0, -1] - s.logits[j]).abs().max().item())
                    t = lg[0, -1].argmax()
                    same &= bool(t == s.tokens[j])
        out[f"b{slots}_max_abs"] = max(errs)
        out[f"b{slots}_same_tokens"] = same
    return out


def _worker() -> dict:
    torch.manual_seed(0)
    cells = {}
    for batch, nh, dqk, dv in ((1, 2, 24, 32), (3, 2, 40, 16), (4, 1, 16, 64)):
        for dt in (torch.float32, torch.bfloat16):
            cells[f"B{batch}_NH{nh}_{dqk}x{dv}_{str(dt)[6:]}"] = _cell_case(batch, nh, dqk, dv, dt, batch + dqk)
    from fastxlstm.engine.kernels import heads_major

    x = torch.randn(37, 100)[:, 3:67]  # a strided column block, as q/k/v of a fused projection are
    y = heads_major(x, 4)
    split = bool(torch.equal(y, x.reshape(37, 4, 16).transpose(0, 1)) and y.is_contiguous())
    return {"cell": cells, "gemv": _gemv_cases(), "engine": _engine_case(), "heads_major_exact": split,
            "gates": _gates_case()}


def _gates_case() -> dict:
    """The gates kernel in both output layouts ([N, NH] and head-major [N // seq, NH, seq]) against
    the soft-capped, masked float32 math written out here."""
    from fastxlstm.engine.kernels import gates

    g = torch.Generator().manual_seed(5)
    nh, b, s = 3, 2, 7
    pre = torch.randn(b * s, 40, generator=g)[:, 5:5 + 2 * nh] * 20  # strided rows, past the cap
    bias = torch.randn(2 * nh, generator=g)
    real = torch.rand(b * s, generator=g) > 0.3
    z = 15 * torch.tanh((pre + bias) / 15)
    want_i = torch.where(real[:, None], z[:, :nh], float("-inf"))
    want_f = torch.where(real[:, None], z[:, nh:], float("inf"))
    out = {}
    for name, seq in (("rows", None), ("head_major", s)):
        i, f = gates(pre, nh, 15.0, real, bias=bias, seq=seq)
        if seq is not None:
            assert i.shape == (b, nh, s) and i.is_contiguous()
            i, f = (t.transpose(1, 2).reshape(b * s, nh) for t in (i, f))
        fin = torch.isfinite(want_i)
        out[name] = {"i": _rel(i[fin], want_i[fin]), "f": _rel(f[fin], want_f[fin]),
                     "masked_exact": bool(torch.equal(i[~fin], want_i[~fin]) and torch.equal(f[~fin], want_f[~fin]))}
    return out


@pytest.fixture(scope="module")
def interp() -> dict:
    from tests.helpers import run_interpreter_worker

    return run_interpreter_worker(__file__)


def test_decode_cell_matches_reference(interp):
    for name, r in interp["cell"].items():
        assert r["inactive_same"], name
        assert r["n"] < 1e-5 and r["m"] < 1e-6, (name, r)
        # a bf16 C store: the start state is rounded to bf16 and the new one once more (relative 2^-9)
        tol = 1e-5 if name.endswith("float32") else 4e-3
        assert r["y"] < tol and r["C"] < tol, (name, r)


def test_gemv_prologues_epilogues_match_torch(interp):
    for shape, r in interp["gemv"].items():
        for name, err in r.items():
            assert err < 1e-5, (shape, name, err)


def test_heads_major_copy(interp):
    assert interp["heads_major_exact"]


def test_gates_kernel_layouts(interp):
    for name, r in interp["gates"].items():
        assert r["masked_exact"], name
        assert r["i"] < 1e-6 and r["f"] < 1e-6, (name, r)


def test_engine_decode_paths_match_model(interp):
    e = interp["engine"]
    assert e["b1_paths"] == ["triton", True, True]
    assert e["b3_paths"] == ["triton", True, True]
    for b in ("b1", "b3"):
        assert e[f"{b}_same_tokens"], b
        assert e[f"{b}_max_abs"] < 1e-4, (b, e[f"{b}_max_abs"])


def test_bf16_state_store_on_cpu():
    """``state_dtype="bfloat16"`` (the config's ``inference_state_dtype``): C is stored in bf16 (the
    reference step computes in float32 and rounds the stored C), reads come back float32, logits
    stay close to the float32 store's, and bad names are rejected."""
    from fastxlstm.config import XLSTMConfig
    from fastxlstm.engine import Engine
    from tests.helpers import perturbed_model

    cfg = XLSTMConfig(vocab_size=259, embedding_dim=64, num_blocks=2, num_heads=2, weight_mode="fused")
    logits = {}
    for sdt in ("float32", "bfloat16"):
        eng = Engine(perturbed_model(cfg), max_slots=2, state_dtype=sdt)
        assert eng.states[0][0].dtype == getattr(torch, sdt) and eng.states[0][1].dtype == torch.float32
        s = eng.allocate_slot()
        eng.sample([s], eng.prefill_into_slots([s], [list(range(3, 50))]))
        logits[sdt] = torch.stack([eng.decode_step([s], return_logits=True).logits[0] for _ in range(6)])
        assert all(t.dtype == torch.float32 for t in eng.get_slot_state(s)[0])
    err = _rel(logits["bfloat16"], logits["float32"])
    assert 0 < err < 1e-2, err
    with pytest.raises(ValueError, match="state dtype"):
        Engine(perturbed_model(cfg), max_slots=1, state_dtype="float16")


if __name__ == "__main__":  # the interpreter worker (TRITON_INTERPRET=1 set by the fixture)
    print(json.dumps(_worker()))
