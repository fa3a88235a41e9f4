"""Prompts of different lengths in one prefill forward (right padding with neutral gates): each row must
compute exactly what the prompt computes alone (float32 CPU: logits close, greedy tokens equal, final
states close), on the reference path and, under the Triton interpreter (one subprocess, so
``TRITON_INTERPRET`` never leaks into this process), on the Triton chunkwise kernels, which must take the
``i = -inf`` / ``f = +inf`` gates of the pad positions without a NaN."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastxlstm.config import XLSTMConfig

from .helpers import perturbed_model

ROOT = Path(__file__).resolve().parents[1]
CFG = XLSTMConfig(vocab_size=259, embedding_dim=64, num_blocks=2, num_heads=2, weight_mode="fused", chunk_size=16)
# 1 token, a partial kernel chunk, exact kernel chunks, and lengths crossing the runner's prefill chunks
LENGTHS = [1, 7, 16, 33, 50, 2]


def _prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, CFG.vocab_size, (n,), generator=g).tolist() for n in lengths]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _compare(backend, prompts: list[list[int]], starts) -> dict:
    """Worst relative errors of the batched prefill against each prompt alone, and whether the greedy
    tokens and a few greedy decode steps after it agree."""
    logits, states = backend.prefill_batch(prompts, starts)
    worst = {"logits": 0.0, "state": 0.0}
    same_tokens = True
    nan = bool(torch.isnan(logits).any()) or any(torch.isnan(t).any().item() for s in states for la in s for t in la)
    for j, p in enumerate(prompts):
        want_logits, want_state = backend.prefill(p, starts[j])
        worst["logits"] = max(worst["logits"], _rel(logits[j], want_logits))
        for layer, want_layer in zip(states[j], want_state):
            for t, w in zip(layer, want_layer):
                worst["state"] = max(worst["state"], _rel(t, w))
        same_tokens &= int(logits[j].argmax()) == int(want_logits.argmax())
        # the state carries on: the same greedy continuation from either state
        a, b = states[j], want_state
        tok_a = tok_b = int(want_logits.argmax())
        for _ in range(3):
            la, a = backend.prefill([tok_a], a)
            lb, b = backend.prefill([tok_b], b)
            tok_a, tok_b = int(la.argmax()), int(lb.argmax())
            same_tokens &= tok_a == tok_b
    return {**worst, "same_tokens": same_tokens, "nan": nan}


def _start_states(backend, n: int):
    return [backend.prefill(p, None)[1] for p in _prompts([5 + 3 * j for j in range(n)], seed=7)]


# 7: the last runner chunk is one token (50 = 7 * 7 + 1), which takes the step path with padded rows
@pytest.mark.parametrize("runner_chunk", [4096, 16, 7, 5])
@pytest.mark.parametrize("with_state", [False, True])
def test_padded_prefill_equals_each_alone(runner_chunk, with_state):
    from fastxlstm.engine.backend import EngineSlotBackend

    be = EngineSlotBackend(perturbed_model(CFG), max_slots=2, prefill_chunk_size=runner_chunk)
    prompts = _prompts(LENGTHS, seed=runner_chunk)
    starts = _start_states(be, len(prompts)) if with_state else [None] * len(prompts)
    got = _compare(be, prompts, starts)
    assert not got["nan"]
    assert got["logits"] < 1e-4 and got["state"] < 1e-4, got  # float32 reassociation (chunk splits differ)
    assert got["same_tokens"], got


def test_runner_rejects_bad_lengths():
    from fastxlstm.engine.runner import Runner

    runner = Runner(perturbed_model(CFG))
    ids = torch.zeros(2, 5, dtype=torch.long)
    for bad in ([5], [0, 5], [6, 5]):
        with pytest.raises(ValueError, match="lengths"):
            runner.forward_tokens(ids, None, bad)


def test_pad_tokens_do_not_matter():
    """Whatever ids fill the padding, the rows' results are the same (the pads are inert)."""
    from fastxlstm.engine.runner import Runner

    runner = Runner(perturbed_model(CFG), chunk_size=16)
    prompts = _prompts([3, 20, 9], seed=3)
    outs = []
    for fill in (0, 5, 200):
        ids = torch.tensor([p + [fill] * (20 - len(p)) for p in prompts])
        hidden, state = runner.forward_tokens(ids, None, [len(p) for p in prompts])
        outs.append((runner.logits(hidden), state))
    for logits, state in outs[1:]:
        assert torch.equal(logits, outs[0][0])
        for layer, ref_layer in zip(state, outs[0][1]):
            for t, r in zip(layer, ref_layer):
                assert torch.equal(t, r)


# ------------------------------------------------------------------------- Triton interpreter
def _kernel_cases() -> dict:
    """The Triton chunkwise forward on a right-padded batch (neutral gates on the pads), with and without a
    start state, against each row alone; plus the whole engine prefill on the Triton backend."""
    import fastxlstm.ops.triton as T
    from fastxlstm.engine.backend import EngineSlotBackend

    g = torch.Generator().manual_seed(0)
    b, nh, s, dqk, dv = 3, 2, 45, 16, 16
    lens = [45, 20, 7]
    q, k = torch.randn(b, nh, s, dqk, generator=g), torch.randn(b, nh, s, dqk, generator=g)
    v = torch.randn(b, nh, s, dv, generator=g)
    i, f = torch.randn(b, nh, s, generator=g) * 3, torch.randn(b, nh, s, generator=g) * 3 + 3
    mi, mf = i.clone(), f.clone()
    for row, n in enumerate(lens):
        mi[row, :, n:], mf[row, :, n:] = float("-inf"), float("inf")
    out: dict = {}
    for init in (False, True):
        st = (torch.randn(b, nh, dqk, dv, generator=g) * 0.3, torch.randn(b, nh, dqk, generator=g),
              torch.randn(b, nh, generator=g)) if init else None
        h, (c, n_, m) = T.mlstm_chunkwise(q, k, v, mi, mf, st, chunk_size=16)
        worst, nan = 0.0, any(torch.isnan(t).any().item() for t in (h, c, n_, m))
        for row, n in enumerate(lens):
            r = slice(row, row + 1)
            s1 = tuple(t[r] for t in st) if st is not None else None
            h1, (c1, n1, m1) = T.mlstm_chunkwise(q[r, :, :n], k[r, :, :n], v[r, :, :n], i[r, :, :n], f[r, :, :n],
                                                 s1, chunk_size=16)
            worst = max(worst, _rel(h[r, :, :n], h1), _rel(c[r], c1), _rel(n_[r], n1), _rel(m[r], m1))
        out[f"kernel_init{int(init)}"] = {"err": worst, "nan": nan}
    be = EngineSlotBackend(perturbed_model(CFG), max_slots=2, backend="triton")
    out["engine"] = _compare(be, _prompts([1, 7, 16, 33]), [None] * 4)
    return out


@pytest.fixture(scope="module")
def interpreted() -> dict:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]))
    proc = subprocess.run([sys.executable, "-m", "tests.test_engine_padded_prefill"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", ["kernel_init0", "kernel_init1"])
def test_triton_chunkwise_padded_rows(interpreted, case):
    got = interpreted[case]
    assert not got["nan"] and got["err"] < 1e-5, got


def test_triton_engine_padded_prefill(interpreted):
    got = interpreted["engine"]
    assert not got["nan"] and got["same_tokens"], got
    assert got["logits"] < 1e-4 and got["state"] < 1e-4, got


if __name__ == "__main__":  # the interpreter worker (TRITON_INTERPRET=1 set by the fixture)
    torch.set_grad_enabled(False)
    print(json.dumps(_kernel_cases()))
