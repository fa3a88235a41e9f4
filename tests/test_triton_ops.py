"""Triton mLSTM kernels vs the reference ops.

CPU: every kernel runs under the Triton interpreter (float32, small shapes) in ONE subprocess, so that
``TRITON_INTERPRET`` never leaks into this process (other modules decide at import time whether to
interpret); the subprocess is this file run as a script and prints its measurements as JSON. Each
error is ||out - ref|| / ||ref|| against the float64 reference (forward, final state, and the gradients
of the float64 reference's autograd); the bound is a fixed floor or 4x the error of the float32
reference on the same inputs, whichever is larger (badly conditioned inputs, e.g. extreme gates, cost
every float32 implementation accuracy).

GPU (``-m gpu``): bf16 and fp32 at the 7B shapes (NH 8, DQK 256, DV 512) vs float64, fresh inputs.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

FWD_FLOOR = 2e-5
GRAD_FLOOR = 5e-5
# With extreme gates single tokens are badly conditioned (|den| near its floor, 1/Den ~ 1/eps), and the
# gate gradients, formed from q.dq - k.dk per token as in the official kernels, cancel: up to ~1e-4 of
# the total is seen there (the float32 reference: ~1e-5). The same cancellation reaches df and dm0 when the
# initial state's stabiliser wins every chunk ("retain" gates: ~2.5e-4 there, the float32 reference ~8e-6).
# Triton 3.9's interpreter (the CPU suite's, 2026-12-03) measures 1.15e-4 on the extreme forward case and 4.7e-4
# on the retain-gate dm0 (3.x before: under 9.4e-5 / 3e-4); the bounds keep 1.3x headroom over those.
EXTREME_GRAD_FLOOR = 6e-4
EXTREME_FWD_FLOOR = 1.5e-4


# ----------------------------------------------------------------------------- the worker (subprocess)
def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _inputs(seed, b, nh, s, dqk, dv, gates="normal", with_state=False):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(b, nh, s, dqk, generator=g), torch.randn(b, nh, s, dqk, generator=g)
    v = torch.randn(b, nh, s, dv, generator=g)
    if gates == "normal":
        i = torch.randn(b, nh, s, generator=g) * 3
        f = torch.randn(b, nh, s, generator=g) * 3 + 1
    elif gates == "retain":  # forget gates near 1 and (below) a large initial m: the initial state's
        # stabiliser wins every chunk, so gradients flow along m0's own path of the max
        i = torch.randn(b, nh, s, generator=g) * 3
        f = torch.randn(b, nh, s, generator=g) + 6
    else:  # extreme: gates pushed against the model's soft cap (15) both ways, so that the stabiliser's
        # eps and floor paths matter and exponents span a wide range
        i = 15 * torch.tanh(torch.randn(b, nh, s, generator=g) * 2)
        f = 15 * torch.tanh(torch.randn(b, nh, s, generator=g) * 2)
    state = None
    if with_state:
        state = (torch.randn(b, nh, dqk, dv, generator=g), torch.randn(b, nh, dqk, generator=g),
                 torch.randn(b, nh, generator=g) * 3 + (15 if gates == "retain" else 0))
    return [q, k, v, i, f], state


def _weighted(fn, xs, seed, use=("h", "C", "n", "m"), **kw):
    """sum of the outputs named in ``use`` times fixed random weights (the others get no gradient)."""
    h, (c, n, m) = fn(*xs[:5], tuple(xs[5:]) if len(xs) > 5 else None, **kw)
    g = torch.Generator().manual_seed(seed + 999)
    return sum((t * torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.device, t.dtype)).sum()
               for name, t in zip(("h", "C", "n", "m"), (h, c, n, m)) if name in use)


FWD_CASES = {
    # name: (seed, B, NH, S, DQK, DV, gates, state, kernel_chunk)
    "ragged_nostate": (1, 2, 2, 45, 24, 40, "normal", False, 16),
    "ragged_state": (2, 2, 2, 45, 24, 40, "normal", True, 16),
    "one_token": (3, 1, 2, 1, 16, 16, "normal", True, 16),
    "exact_chunks": (4, 1, 2, 64, 32, 32, "normal", False, 32),
    "shorter_than_chunk": (5, 1, 2, 20, 16, 48, "normal", True, 32),
    "extreme_nostate": (6, 1, 2, 50, 16, 32, "extreme", False, 16),
    "extreme_state": (7, 1, 2, 50, 16, 32, "extreme", True, 16),
}
GRAD_CASES = {
    "ragged_nostate": (11, 1, 2, 45, 24, 40, "normal", False, 16),
    "ragged_state": (12, 2, 1, 45, 24, 40, "normal", True, 16),
    "shorter_than_chunk": (13, 1, 2, 20, 16, 16, "normal", True, 32),
    "extreme_nostate": (14, 1, 2, 40, 16, 32, "extreme", False, 16),
    "extreme_state": (15, 1, 2, 40, 16, 32, "extreme", True, 16),
    "retain_state": (16, 1, 2, 40, 16, 32, "retain", True, 16),
}
# gradients reaching only some outputs (the final state's dC/dn/dm absent: the backward's optional terms)
PARTIAL_GRAD_CASES = {
    # name: (seed, B, NH, S, DQK, DV, gates, state, kernel_chunk, outputs in the loss)
    "h_only_state": (41, 1, 2, 37, 16, 32, "normal", True, 16, ("h",)),
    "h_only_retain": (42, 1, 2, 37, 16, 32, "retain", True, 16, ("h",)),
    "h_and_m": (43, 1, 2, 37, 16, 32, "retain", True, 16, ("h", "m")),
    "h_and_C_nostate": (44, 1, 2, 37, 16, 32, "normal", False, 16, ("h", "C")),
}
NAMES = ["h", "C", "n", "m"]
GRAD_NAMES = ["q", "k", "v", "i", "f", "C0", "n0", "m0"]
# every gradient case with the outputs in its loss (the full cases: all of them)
ALL_GRAD_CASES = {**{name: (*case, tuple(NAMES)) for name, case in GRAD_CASES.items()}, **PARTIAL_GRAD_CASES}


def _worker() -> dict:
    from fastxlstm.ops import mlstm_chunkwise as dispatch
    from fastxlstm.ops import triton as T
    from fastxlstm.ops.reference import mlstm_chunkwise_reference as ref
    from fastxlstm.ops.reference import mlstm_step_reference

    assert T.INTERPRET
    out: dict = {"fwd": {}, "grad": {}, "step": {}, "misc": {}, "plans": {}}
    for name, (seed, b, nh, s, dqk, dv, gates, st, kc) in FWD_CASES.items():
        xs, state = _inputs(seed, b, nh, s, dqk, dv, gates, st)
        h, fin = T.mlstm_chunkwise(*xs, state, kernel_chunk=kc)
        r64 = ref(*(t.double() for t in xs), None if state is None else tuple(t.double() for t in state),
                  chunk_size=16)
        r32 = ref(*xs, state, chunk_size=kc)
        outs, o64, o32 = [h, *fin], [r64[0], *r64[1]], [r32[0], *r32[1]]
        out["fwd"][name] = {nm: (_rel(a, r), _rel(c, r)) for nm, a, c, r in zip(NAMES, outs, o32, o64)}
    # the kernel chunk (state granularity) changes nothing but rounding
    xs, state = _inputs(21, 1, 2, 70, 16, 32, "normal", True)
    a = T.mlstm_chunkwise(*xs, state, kernel_chunk=16)
    c = T.mlstm_chunkwise(*xs, state, kernel_chunk=64)
    out["misc"]["chunk_independent"] = max(_rel(a[0], c[0]), _rel(a[1][0], c[1][0]))
    # explicit launch plans (no autotuner; the sweep's path): state tiles that split DQK and DV unevenly, the
    # output kernel's DV in three parts
    from fastxlstm.ops.triton import _chunkwise

    xs, state = _inputs(22, 1, 2, 45, 24, 40, "normal", True)
    r64 = ref(*(t.double() for t in xs), tuple(t.double() for t in state), chunk_size=16)
    flat = [t.reshape(2, 45, -1).squeeze(-1).contiguous() for t in xs]
    init = T._flat_state(state, 2, 24, 40)
    for st_row, out_row in (((16, 16, 4, 2), (16, 16, 3, 4, 2)), ((16, 32, 4, 3), (16, 32, 2, 8, 2))):
        plan = _chunkwise.Plan(st_row, out_row)
        with _launches(_chunkwise) as calls:
            o = _chunkwise.forward(*flat, *init, 1e-6, 16, plan=plan)
        err = max(
            _rel(o["h"].view(r64[0].shape), r64[0]), _rel(o["cn"].view(r64[1][0].shape), r64[1][0]),
            _rel(o["nn"].view(r64[1][1].shape), r64[1][1]), _rel(o["mn"].view(r64[1][2].shape), r64[1][2]))
        # the launches the plan asked for: each kernel once, directly, with the plan's configs
        wanted = [("_states_fixed", plan.states_meta()), ("_out_fixed", plan.out_meta())]
        out["plans"][f"{st_row}/{out_row}"] = (err, len(calls) == len(wanted) and all(
            name == want and all(kw.get(k) == x for k, x in meta.items())
            for (name, _, kw), (want, meta) in zip(calls, wanted)))
    out["strided"] = _strided_cases(T)
    # the public dispatcher picks these kernels with backend="triton"
    d = dispatch(*xs, state, chunk_size=16, backend="triton")
    out["misc"]["dispatch"] = _rel(d[0], ref(*(t.double() for t in xs), tuple(t.double() for t in state))[0])
    for name, (seed, b, nh, s, dqk, dv, gates, st, kc, use) in ALL_GRAD_CASES.items():
        xs, state = _inputs(seed, b, nh, s, dqk, dv, gates, st)
        leaves = xs + (list(state) if state is not None else [])
        ours = [t.clone().requires_grad_() for t in leaves]
        r64 = [t.double().requires_grad_() for t in leaves]
        r32 = [t.clone().requires_grad_() for t in leaves]
        _weighted(T.mlstm_chunkwise, ours, seed, use, kernel_chunk=kc).backward()
        _weighted(ref, r64, seed, use, chunk_size=16).backward()
        _weighted(ref, r32, seed, use, chunk_size=kc).backward()
        out["grad"][name] = {nm: (_rel(a.grad, r.grad), _rel(c.grad, r.grad))
                             for nm, a, c, r in zip(GRAD_NAMES, ours, r32, r64)}
    # decode step: functional (with/without state), in place on strided gate views, == chunkwise
    xs, state = _inputs(31, 3, 2, 6, 24, 40, "normal", True)
    q, k, v, i, f = xs
    for with_state in (False, True):
        st = state if with_state else None
        h, ns = T.mlstm_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], i[:, :, 0], f[:, :, 0], st)
        hr, nr = mlstm_step_reference(*(t[:, :, 0].double() for t in xs),
                                      None if st is None else tuple(t.double() for t in st))
        out["step"][f"functional_state={with_state}"] = max(_rel(h, hr), *(_rel(a, r) for a, r in zip(ns, nr)))
    c, n, m = (t.clone() for t in state)
    hbuf = torch.empty(3, 2, 40)
    gates = torch.stack([i, f], dim=-1)  # i, f as strided views, like slices of a fused projection
    for t in range(6):
        T.mlstm_step_(q[:, :, t].contiguous(), k[:, :, t].contiguous(), v[:, :, t].contiguous(),
                      gates[:, :, t, 0], gates[:, :, t, 1], c, n, m, hbuf)
    hc, (cc, nc, mc) = ref(*(t.double() for t in xs), tuple(t.double() for t in state), chunk_size=4)
    out["step"]["inplace_vs_chunkwise"] = max(_rel(hbuf, hc[:, :, -1]), _rel(c, cc), _rel(n, nc), _rel(m, mc))
    try:
        T.mlstm_step_(q[:, :, 0], k[:, :, 0], v[:, :, 0], i[:, :, 0], f[:, :, 0], c.double(), n, m, hbuf)
        out["misc"]["bad_state_dtype_raises"] = False
    except ValueError:
        out["misc"]["bad_state_dtype_raises"] = True
    bad_calls = {  # name: a call that must raise ValueError
        "kernel_chunk_not_pow2": lambda: T.mlstm_chunkwise(*xs, state, kernel_chunk=24),
        "kernel_chunk_too_large": lambda: T.mlstm_chunkwise(*xs, state, kernel_chunk=512),
        "step_h_out_shape": lambda: T.mlstm_step_(q[:, :, 0], k[:, :, 0], v[:, :, 0], i[:, :, 0], f[:, :, 0], c, n,
                                                  m, hbuf[:, :, :-1]),
    }
    for name, call in bad_calls.items():
        try:
            call()
            out["misc"][f"{name}_raises"] = False
        except ValueError:
            out["misc"][f"{name}_raises"] = True
    return out


#: the forward's kernel launchers in ``_chunkwise`` (autotuned, and direct for a :class:`Plan`)
LAUNCHERS = ("fwd_states", "fwd_out", "_states_fixed", "_out_fixed")


class _Recorded:
    """A kernel launcher (``launcher[grid](*args, **kwargs)``) that appends ``(name, args, kwargs)`` to ``calls``
    before each launch."""

    def __init__(self, calls: list, name: str, launcher):
        self.calls, self.name, self.launcher = calls, name, launcher

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((self.name, args, kwargs))
            return self.launcher[grid](*args, **kwargs)
        return launch


@contextlib.contextmanager
def _launches(module):
    """The launches of ``module``'s :data:`LAUNCHERS` inside ``with``, in order (they still run)."""
    calls: list = []
    with mock.patch.multiple(module, **{name: _Recorded(calls, name, getattr(module, name)) for name in LAUNCHERS}):
        yield calls


def _fused_views(proj, nh, dqk, dv):
    """q, k, v ``[B,NH,S,D]`` as views into a fused projection ``proj [B,S,P]`` (``q | k | v | ...``)."""
    b, s, _ = proj.shape
    q = proj[..., :nh * dqk].view(b, s, nh, dqk).transpose(1, 2)
    k = proj[..., nh * dqk:2 * nh * dqk].view(b, s, nh, dqk).transpose(1, 2)
    v = proj[..., 2 * nh * dqk:2 * nh * dqk + nh * dv].view(b, s, nh, dv).transpose(1, 2)
    return q, k, v


STRIDED_CASES = {
    # name: (seed, B, NH, S, DQK, DV, state, kernel_chunk); S not a multiple of the chunk (partial last chunk)
    "b1_nostate": (51, 1, 2, 45, 24, 40, False, 16),
    "b1_state": (52, 1, 2, 45, 24, 40, True, 16),
    "b2_state": (53, 2, 3, 37, 16, 32, True, 32),
}


def _strided_cases(T) -> dict:
    """Forward (no grad) on q, k, v viewed in place in a fused projection (the engine's prefill layout) vs
    the same values as contiguous tensors: ``(bitwise equal, max relative difference)`` per output, and
    whether the kernels read the views in place; plus a last dim that is not contiguous (copied) and the
    autograd path on strided inputs."""
    from fastxlstm.ops.triton import _chunkwise

    res: dict = {"in_place": {}}
    # views whose in-tile token offsets reach int32 (chunk * token stride + D >= 2**31) are copied instead
    # (meta tensors: strides without storage)
    fits, past = (torch.empty_strided((1, 2, 4, 128), (0, 128, st, 1), device="meta") for st in (2**24 - 2, 2**24 - 1))
    res["int32_bound"] = T._strided(fits, 128) is fits and T._strided(past, 128).is_contiguous()
    for name, (seed, b, nh, s, dqk, dv, st, kc) in STRIDED_CASES.items():
        g = torch.Generator().manual_seed(seed)
        width = 2 * nh * (dqk + dv + 1)
        proj = torch.randn(b, s, width, generator=g)
        q, k, v = _fused_views(proj, nh, dqk, dv)
        assert q.stride(-1) == 1 and not q.is_contiguous() and q.stride(2) == width
        i = torch.randn(b, nh, s, generator=g) * 3
        f = torch.randn(b, nh, s, generator=g) * 3 + 1
        state = None
        if st:
            state = (torch.randn(b, nh, dqk, dv, generator=g), torch.randn(b, nh, dqk, generator=g),
                     torch.randn(b, nh, generator=g))
        with torch.no_grad():
            with _launches(_chunkwise) as calls:
                a = T.mlstm_chunkwise(q, k, v, i, f, state, kernel_chunk=kc)
            c = T.mlstm_chunkwise(q.contiguous(), k.contiguous(), v.contiguous(), i, f, state, kernel_chunk=kc)
        res[name] = {nm: (bool(torch.equal(x, y)), _rel(x, y))
                     for nm, x, y in zip(NAMES, [a[0], *a[1]], [c[0], *c[1]])}
        # the kernels got the views themselves (state kernel: k, v; output kernel: q, k, v), not copies
        wanted = [("fwd_states", (k, v)), ("fwd_out", (q, k, v))]
        res["in_place"][name] = [nm for nm, _, _ in calls] == [nm for nm, _ in wanted] and all(
            x.data_ptr() == y.data_ptr() and x.stride() == y.stride()
            for (_, args, _), (_, views) in zip(calls, wanted) for x, y in zip(args, views))
        if name == "b1_state":
            # a non-contiguous last dim is copied: same result
            qt = q.contiguous().transpose(-1, -2).contiguous().transpose(-1, -2)
            with torch.no_grad():
                t = T.mlstm_chunkwise(qt, k, v, i, f, state, kernel_chunk=kc)
            res["last_dim_strided"] = {nm: (bool(torch.equal(x, y)), _rel(x, y))
                                       for nm, x, y in zip(NAMES, [t[0], *t[1]], [c[0], *c[1]])}
            # autograd path (contiguous copies inside): gradients reach the fused projection
            pg = proj.clone().requires_grad_()
            qg, kg, vg = _fused_views(pg, nh, dqk, dv)
            leaves = [x.contiguous().requires_grad_() for x in (q, k, v)]
            _weighted(T.mlstm_chunkwise, [qg, kg, vg, i, f, *state], seed, kernel_chunk=kc).backward()
            _weighted(T.mlstm_chunkwise, [*leaves, i, f, *state], seed, kernel_chunk=kc).backward()
            qv, kv, vv = _fused_views(pg.grad, nh, dqk, dv)
            res["grad_strided"] = {nm: (bool(torch.equal(x, y.grad)), _rel(x, y.grad))
                                   for nm, x, y in zip("qkv", (qv, kv, vv), leaves)}
    return res


# ----------------------------------------------------------------------------- CPU tests
@pytest.fixture(scope="module")
def interp():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve())], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(res, indent=1))  # shown with -s / on failure
    return res


def _bound(errs: dict, floor: float) -> float:
    return max(floor, 4 * max(r32 for _, r32 in errs.values()))


@pytest.mark.parametrize("case", list(FWD_CASES))
def test_forward_and_final_state_match_reference(interp, case):
    errs = interp["fwd"][case]
    bound = _bound(errs, EXTREME_FWD_FLOOR if case.startswith("extreme") else FWD_FLOOR)
    for name, (ours, r32) in errs.items():
        assert ours <= bound, f"{case} {name}: {ours:.2e} > {bound:.2e} (float32 reference: {r32:.2e})"


@pytest.mark.parametrize("case", list(ALL_GRAD_CASES))
def test_gradients_match_reference_autograd(interp, case):
    errs = interp["grad"][case]
    gates, has_state = ALL_GRAD_CASES[case][6:8]
    bound = _bound(errs, EXTREME_GRAD_FLOOR if case.startswith("extreme") or gates == "retain" else GRAD_FLOOR)
    assert set(errs) == set(GRAD_NAMES[:8 if has_state else 5])
    for name, (ours, r32) in errs.items():
        assert ours <= bound, f"{case} d{name}: {ours:.2e} > {bound:.2e} (float32 reference: {r32:.2e})"


def test_kernel_chunk_and_dispatcher(interp):
    assert interp["misc"]["chunk_independent"] < 1e-5
    assert interp["misc"]["dispatch"] < FWD_FLOOR


@pytest.mark.parametrize("case", [*STRIDED_CASES, "last_dim_strided", "grad_strided"])
def test_strided_inputs_match_contiguous(interp, case):
    """q, k, v read in place from a fused projection give what their contiguous copies give (same tiles and
    arithmetic: bitwise in the interpreter; fp32 tolerance as the bound)."""
    for name, (equal, rel) in interp["strided"][case].items():
        assert equal or rel < 1e-6, f"{case} {name}: {rel:.2e}"


@pytest.mark.parametrize("case", list(STRIDED_CASES))
def test_strided_inputs_read_in_place(interp, case):
    """No-grad forward on fused-projection views: the state and output kernels get the views (no copies)."""
    assert interp["strided"]["in_place"][case] is True


def test_strided_views_past_int32_offsets_are_copied(interp):
    assert interp["strided"]["int32_bound"] is True


def test_launch_plans_match_reference(interp):
    """An explicit Plan launches each forward kernel once, directly, with its configs (no autotuned launch)."""
    assert len(interp["plans"]) == 2
    for name, (err, as_planned) in interp["plans"].items():
        assert err < FWD_FLOOR, f"{name}: {err:.2e}"
        assert as_planned, f"{name}: not launched as planned"


def test_decode_step(interp):
    for name, err in interp["step"].items():
        assert err < FWD_FLOOR, f"{name}: {err:.2e}"
    assert interp["misc"]["bad_state_dtype_raises"]
    for name in ("kernel_chunk_not_pow2", "kernel_chunk_too_large", "step_h_out_shape"):
        assert interp["misc"][f"{name}_raises"], name


# ----------------------------------------------------------------------------- GPU tests
def _gpu_inputs(b, s, dtype, seed, with_state):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(b, 8, s, 256, generator=g), torch.randn(b, 8, s, 256, generator=g)
    v = torch.randn(b, 8, s, 512, generator=g)
    i = 15 * torch.tanh((torch.randn(b, 8, s, generator=g) * 4 - 3) / 15)
    f = 15 * torch.tanh((torch.randn(b, 8, s, generator=g) * 3 + 4) / 15)
    xs = [t.cuda().to(dtype) for t in (q, k, v)] + [i.cuda(), f.cuda()]
    state = None
    if with_state:
        state = (torch.randn(b, 8, 256, 512, generator=g).cuda() * 0.3, torch.randn(b, 8, 256, generator=g).cuda(),
                 torch.randn(b, 8, generator=g).cuda())
    return xs, state


def _gpu_bound(dtype, bf16_bound, errs32):
    """bf16: a fixed bound; fp32: the CPU tests' rule (4x the float32 reference's own error, >= 1e-4)."""
    return bf16_bound if dtype == torch.bfloat16 else max(1e-4, 4 * max(errs32))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("seq,with_state", [(4096, False), (1000, True)])
def test_gpu_forward_7b_shapes(dtype, seq, with_state):
    from fastxlstm.ops import triton as T
    from fastxlstm.ops.reference import mlstm_chunkwise_reference

    xs, state = _gpu_inputs(1, seq, dtype, int.from_bytes(os.urandom(2), "little"), with_state)
    h, fin = T.mlstm_chunkwise(*xs, state)
    r = mlstm_chunkwise_reference(*(t.double() for t in xs),
                                  None if state is None else tuple(t.double() for t in state))
    r32 = mlstm_chunkwise_reference(*xs, state)
    bound = _gpu_bound(dtype, 1e-2, [_rel(a, b) for a, b in zip([r32[0], *r32[1]], [r[0], *r[1]])])
    for name, a, b in zip(NAMES, [h, *fin], [r[0], *r[1]]):
        assert not torch.isnan(a).any(), name
        assert _rel(a, b) < bound, f"{name}: {_rel(a, b):.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("batch,seq", [(1, 1000), (2, 300)])
def test_gpu_strided_inputs_7b_shapes(batch, seq):
    """bf16 q, k, v read in place from a fused projection ``[B,S,P]`` == their contiguous copies."""
    from fastxlstm.ops import triton as T

    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(2), "little"))
    proj = torch.randn(batch, seq, 2 * 8 * (256 + 512 + 1), generator=g).cuda().bfloat16()
    i = 15 * torch.tanh((torch.randn(batch, 8, seq, generator=g) * 4 - 3) / 15).cuda()
    f = 15 * torch.tanh((torch.randn(batch, 8, seq, generator=g) * 3 + 4) / 15).cuda()
    state = (torch.randn(batch, 8, 256, 512, generator=g).cuda() * 0.3, torch.randn(batch, 8, 256, generator=g).cuda(),
             torch.randn(batch, 8, generator=g).cuda())
    q, k, v = _fused_views(proj, 8, 256, 512)
    with torch.no_grad():
        a = T.mlstm_chunkwise(q, k, v, i, f, state)
        c = T.mlstm_chunkwise(q.contiguous(), k.contiguous(), v.contiguous(), i, f, state)
    for name, x, y in zip(NAMES, [a[0], *a[1]], [c[0], *c[1]]):
        print(f"strided B{batch} S{seq} {name}: bitwise {torch.equal(x, y)}, rel {_rel(x, y):.1e}")
        assert _rel(x, y) < 1e-3, f"{name}: {_rel(x, y):.2e}"


def gpu_grad_errors(dtype, seed: int) -> tuple[dict, float]:
    """Relative gradient errors at the 7B shapes (B1, S1000, with state) vs float64, and the test's bound."""
    from fastxlstm.ops import triton as T
    from fastxlstm.ops.reference import mlstm_chunkwise_reference

    xs, state = _gpu_inputs(1, 1000, dtype, seed, True)
    leaves = xs + list(state)
    ours = [t.clone().requires_grad_() for t in leaves]
    ref = [t.double().requires_grad_() for t in leaves]
    ref32 = [t.float().requires_grad_() for t in leaves]
    _weighted(T.mlstm_chunkwise, ours, seed).backward()
    _weighted(mlstm_chunkwise_reference, ref, seed).backward()
    _weighted(mlstm_chunkwise_reference, ref32, seed).backward()
    bound = _gpu_bound(dtype, 3e-2, [_rel(a.grad, r.grad) for a, r in zip(ref32, ref)])
    return {name: _rel(a.grad, r.grad) for name, a, r in zip(GRAD_NAMES, ours, ref)}, bound


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_gradients_7b_shapes(dtype):
    seed = int.from_bytes(os.urandom(2), "little")
    errs, bound = gpu_grad_errors(dtype, seed)
    for name, err in errs.items():
        assert err < bound, f"d{name}: {err:.2e} (seed {seed})"


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 64])
def test_gpu_step_in_cuda_graph(batch):
    from fastxlstm.ops import triton as T
    from fastxlstm.ops.reference import mlstm_step_reference

    xs, state = _gpu_inputs(batch, 4, torch.bfloat16, int.from_bytes(os.urandom(2), "little"), True)
    steps = [tuple(t[:, :, j].contiguous() for t in xs) for j in range(4)]
    static = [torch.empty_like(t) for t in steps[0]]
    c, n, m = (t.clone() for t in state)
    h = torch.empty(batch, 8, 512, device="cuda", dtype=torch.bfloat16)
    T.mlstm_step_(*steps[0], *(t.clone() for t in state), h)  # compile before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        T.mlstm_step_(*static, c, n, m, h)
    ref = tuple(t.double() for t in state)
    for x in steps:
        for dst, src in zip(static, x):
            dst.copy_(src)
        graph.replay()
        hr, ref = mlstm_step_reference(*(t.double() for t in x), ref)
        assert _rel(h, hr) < 1e-2
    for a, r in zip((c, n, m), ref):
        assert _rel(a, r) < 1e-4


if __name__ == "__main__":  # the interpreter worker (TRITON_INTERPRET=1 set by the fixture)
    torch.manual_seed(0)
    print(json.dumps(_worker()))
