"""Test helpers: small random models and their transformers twins, ``fastxlstm serve`` in a subprocess, and
killing a scheduler worker process and waiting for its restart (the serving extras are imported lazily)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from fastxlstm.config import XLSTMConfig
from fastxlstm.model import XLSTMForCausalLM, build_model


def perturbed_model(config: XLSTMConfig, seed: int = 0, scale: float = 0.05) -> XLSTMForCausalLM:
    """Paper init plus noise on every parameter, and gate biases spread over a wide range
    (input gates about N(-1, 1.5), forget gates N(3, 1.5)), so that gates, norms,
    biases and the stabiliser all matter."""
    model = build_model(config, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
            if name.endswith(("igate_preact.bias", "fgate_preact.bias", "ifgate_preact.bias")):
                p.copy_(torch.randn(p.shape, generator=g) * 1.5 + (3.0 if "fgate" in name else -1.0))
    return model.eval()


def hf_config(config: XLSTMConfig):
    from transformers import xLSTMConfig

    data = config.to_dict()
    for key in ("architectures", "model_type", "transformers_version"):
        data.pop(key, None)
    data["weight_mode"] = "single"  # transformers' fused init is broken; weights are loaded split
    return xLSTMConfig(**data)


def hf_twin(model: XLSTMForCausalLM):
    """transformers' xLSTMForCausalLM holding the same weights (single layout)."""
    from transformers import xLSTMForCausalLM

    from fastxlstm.model.hf_layout import single_mode_state

    hf = xLSTMForCausalLM(hf_config(model.config)).eval()
    hf.load_state_dict(single_mode_state(model), strict=True)
    return hf


def decode_cell_reference(proj: torch.Tensor, gate_bias: torch.Tensor, c: torch.Tensor, n: torch.Tensor,
                          m: torch.Tensor, norm_weight: torch.Tensor, cap: float = 15.0, norm_eps: float = 1e-6):
    """float64 reference of the one-launch decode cell (``fastxlstm.ops.triton.mlstm_decode_cell_``), every
    row active: soft-capped gates of ``pre + gate_bias`` (the sum rounded to proj's dtype, as the kernel
    does), the mLSTM step from ``(c, n, m)`` (shape ``[B,NH,DQK,DV]`` etc.), the per-head LayerNorm times
    ``norm_weight`` and the output gate. Returns ``(y [B, NH*DV], (C, n, m))`` in float64."""
    from fastxlstm.ops.reference import mlstm_step_reference

    batch, nh, dqk, dv = c.shape
    q, k, v, o, pre = proj.double().split([nh * dqk, nh * dqk, nh * dv, nh * dv, 2 * nh], -1)
    gates = cap * torch.tanh((pre + gate_bias.double()).to(proj.dtype).double() / cap)
    i, f = gates[:, :nh], gates[:, nh:]
    h, state = mlstm_step_reference(q.reshape(batch, nh, dqk), k.reshape(batch, nh, dqk), v.reshape(batch, nh, dv),
                                    i, f, (c.double(), n.double(), m.double()))
    hn = (h - h.mean(-1, keepdim=True)) * torch.rsqrt(h.var(-1, keepdim=True, unbiased=False) + norm_eps)
    return torch.sigmoid(o) * hn.flatten(-2) * norm_weight.double(), state


def run_interpreter_worker(script: str | Path) -> dict:
    """Run ``script`` (a test file whose ``__main__`` prints one JSON line) in ONE subprocess under
    ``TRITON_INTERPRET=1``, so the variable never leaks into the test process; returns that JSON."""
    import pytest

    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(root / "src"), str(root)]))
    proc = subprocess.run([sys.executable, str(script)], env=env, cwd=root, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@torch.inference_mode()
def greedy_reference(model: XLSTMForCausalLM, input_ids, max_new_tokens: int = 32,
                     eos_token_id: int | None = None) -> torch.Tensor:
    """The test oracle for greedy decoding: the readable loop over the reference model (``model/``),
    prefill once, then one recurrent step per token; ``[B, n]`` generated ids (rows that hit EOS are
    padded with it; stops once every row did). The engine, the server and the CLI must match it."""
    ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.tensor(
        input_ids if input_ids and isinstance(input_ids[0], (list, tuple)) else [list(input_ids)])
    ids = (ids[None] if ids.ndim == 1 else ids).to(device=model.device, dtype=torch.long)
    out = []
    if max_new_tokens > 0:
        logits, state = model(ids, last_logits_only=True)
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        for step in range(max_new_tokens):
            token = logits[:, -1].argmax(dim=-1)
            if eos_token_id is not None:
                token = torch.where(done, torch.full_like(token, eos_token_id), token)
                done |= token == eos_token_id
            out.append(token)
            if step + 1 == max_new_tokens or (eos_token_id is not None and bool(done.all())):
                break
            logits, state = model(token[:, None], state)
    if not out:
        return torch.zeros(ids.shape[0], 0, dtype=torch.long, device=ids.device)
    return torch.stack(out, dim=1)


def load_and_tag(model_dir: str, tag_dir: str):
    """A scheduler worker's loader (``WorkerSpec``) that records the worker's ``FASTXLSTM_TEST_REPLICA``
    environment variable in ``tag_dir/<pid>``, then loads ``model_dir``."""
    from fastxlstm.checkpoint import load

    Path(tag_dir, str(os.getpid())).write_text(os.environ.get("FASTXLSTM_TEST_REPLICA", "unset"))
    return load(model_dir)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_cli(*args: str, new_session: bool = True, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """``python -m fastxlstm serve --port <free port> *args`` as a subprocess (stdout and stderr together, as
    text; ``new_session``: its own process group, as a terminal's foreground job); returns it and its base URL.
    Wait for it with :func:`wait_healthy`; the caller stops it."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "fastxlstm", "serve", "--port", str(port), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=new_session, env=env)
    return proc, f"http://127.0.0.1:{port}"


def wait_healthy(proc: subprocess.Popen, base: str, timeout: float, also: Callable[[], bool] | None = None) -> None:
    """Poll ``base/health`` until it answers 200 (and ``also()`` holds); fail with the server's output if
    ``proc`` exits first, and when ``timeout`` seconds pass."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200 and (also is None or also()):
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"the server was not healthy within {timeout} s"
        time.sleep(0.2)


def children(pid: int) -> list[int]:
    """The process ids of ``pid``'s children (from /proc: Linux only)."""
    return [int(c) for task in Path(f"/proc/{pid}/task").glob("*/children") for c in task.read_text().split()]


def worker_pids(pid: int) -> list[int]:
    """The children of ``pid`` that multiprocessing spawned: a server's scheduler worker processes."""
    def spawned(child: int) -> bool:
        try:
            return "spawn_main" in Path(f"/proc/{child}/cmdline").read_text()
        except OSError:  # it has exited since
            return False

    return [c for c in children(pid) if spawned(c)]


def kill_worker(pid: int, stream: Iterator) -> None:
    """SIGKILL the scheduler worker ``pid``; the stream it was serving (an iterator over an ``openai`` stream)
    then fails with the server's "engine process" error."""
    import openai
    import pytest

    os.kill(pid, signal.SIGKILL)
    with pytest.raises(openai.APIError, match="engine process"):
        for _ in stream:
            pass


def wait_restarted(proxy, old_pid: int, timeout: float = 120.0) -> None:
    """Wait until the watchdog has started a new worker behind ``proxy`` (a ``SchedulerProxy`` whose worker
    was ``old_pid``) and it is ready."""
    deadline = time.monotonic() + timeout
    while not (proxy.alive and proxy.pid != old_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proxy.alive and proxy.pid != old_pid, f"no new worker within {timeout} s (pid {proxy.pid})"
