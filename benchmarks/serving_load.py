"""Serving load test: many concurrent streaming clients against ``fastxlstm serve``.

Measures, in one run on one device:
  1. the peer: the engine's own batched decode (``Engine.decode_step`` over all slots, CUDA graphs,
     no server) at batch = --max-slots, tokens/s;
  2. the server (``python -m fastxlstm serve`` in a subprocess) under --requests streaming
     completions with --concurrency clients at a time (prompt lengths uniform in
     [--min-prompt, --max-prompt] tokens, --output-tokens each, greedy, ignore_eos):
     output throughput, TTFT, inter-token latency (ITL) and TPOT percentiles;
  3. the prefix cache: chat requests sharing a --system-tokens system prompt, cold vs cached TTFT.

Client requests ask ``logprobs: 0`` so that every token arrives as its own SSE chunk (a random
model's tokens mostly decode to no text with the byte-level tokenizer), which makes ITL per token.

    PYTHONPATH=src python benchmarks/serving_load.py --model random:xlstm-1.3b --out results.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def summary(values: list[float], scale: float = 1000.0) -> dict:
    return {"mean": sum(values) / len(values) * scale if values else float("nan"),
            **{f"p{q}": pct(values, q) * scale for q in (50, 90, 99)}}


# ----------------------------------------------------------------------------------------- the peer
def engine_peer(model_spec: str, slots: int, steps: int, dtype: str, prompts: list[str] | None = None,
                out_tokens: int = 0) -> dict:
    """The engine's batched decode without the server: all slots decoding, one CUDA-graph replay per step.
    With ``prompts``, also the engine doing the load test's work offline (``engine_offline``:
    :meth:`LLM.generate` over the same prompts, ``out_tokens`` each, greedy, continuous batching over the
    same slots, prefill included, no HTTP): the ceiling for the server on this workload."""
    import gc

    import torch

    from fastxlstm.checkpoint import load
    from fastxlstm.engine import Engine
    from fastxlstm.sampling import SamplingParams

    dt = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    model = load(model_spec, device="cuda", dtype=dt, weight_mode="fused")
    eng = Engine(model, max_slots=slots)
    ids = [eng.allocate_slot() for _ in range(slots)]
    g = torch.Generator().manual_seed(0)
    starts = [torch.randint(3, 259, (128,), generator=g).tolist() for _ in ids]
    params = SamplingParams(max_new_tokens=10**9, ignore_eos=True)
    logits = eng.prefill_into_slots(ids, starts, params=[params] * slots)
    eng.sample(ids, logits)
    eng.warmup([slots])
    out = {}
    for name, fn in (
        ("graph_replay", lambda: eng.decode_step(return_outputs=False)),
        # what the server's scheduler does per step: explicit slots/tokens in, logits out, argmax, one host sync
        ("scheduler_like", lambda: eng.decode_step(ids, [5] * slots, return_logits=True).logits.argmax(-1).tolist()),
    ):
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
        dt_s = time.perf_counter() - t0
        out[name] = {"step_ms": dt_s / steps * 1000, "tokens_per_s": slots * steps / dt_s}
    if prompts:  # the load test's prompts
        eng = None
        gc.collect()
        torch.cuda.empty_cache()
        try:
            out["engine_offline"] = engine_offline(model, model_spec, slots, prompts, out_tokens)
        except Exception as e:  # keep the decode peer (and the server's engine backend)
            import traceback

            traceback.print_exc()
            out["engine_offline_error"] = f"{type(e).__name__}: {e}"
    return out


def engine_offline(model, model_spec: str, slots: int, prompts: list[str], out_tokens: int) -> dict:
    """:meth:`LLM.generate` over ``prompts`` (``out_tokens`` each, greedy, ``ignore_eos``) on ``slots`` slots:
    the load test's work done by the engine alone, prefill graphs captured first as the server does."""
    import torch

    from fastxlstm.engine import LLM
    from fastxlstm.tokenizer import Tokenizer

    tok = Tokenizer.byte_level() if model_spec.startswith("random:") else Tokenizer.from_dir(model.source_dir)
    ids = [tok.encode(p) for p in prompts]
    llm = LLM(model, max_slots=slots)
    graphs = llm.engine.runner.prefill_graphs
    if graphs is not None:  # no capture inside the timed run
        longest = graphs.bucket(1, max(map(len, ids)))
        for b in (1, 2):  # equal-length prompts share a forward
            for n in graphs.lengths:
                if longest is not None and n <= longest[1]:
                    graphs.capture(b, n)
    llm.generate(ids[:slots], max_new_tokens=4, ignore_eos=True)  # decode graphs
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    res = llm.generate(ids, max_new_tokens=out_tokens, ignore_eos=True)
    sync()
    dt_s = time.perf_counter() - t0
    done = sum(len(r.token_ids) for r in res)
    return {"requests": len(ids), "prompt_tokens": sum(map(len, ids)), "completion_tokens": done, "wall_s": dt_s,
            "output_tokens_per_s": done / dt_s}


# ----------------------------------------------------------------------------------------- backend audit
def backend_audit(model_spec: str, slots: int, dtype: str, min_p: int, max_p: int, budget: int = 2048) -> dict:
    """(Runs in its own process, autotuning off as in ``serve``.) The slot backend's calls as the scheduler
    makes them, without the server: the start-up capture of the prefill graphs the scheduler can use with
    a prefill budget of ``budget`` tokens; host time (until the call returns) and total time (until the
    device is done) of one-by-one vs batched mixed-length prefill, a prefilled group's hand-over
    (prefix-cache copy, slot load, first-token read) and a 4-step greedy window over all slots; and which
    calls wait for the device (``torch.cuda.set_sync_debug_mode``: every synchronising call and where it
    was made), made by the backend alone and by the real scheduler loop over a wave of requests."""
    import statistics
    import warnings

    import torch

    from fastxlstm.checkpoint import load
    from fastxlstm.engine.backend import EngineSlotBackend
    from fastxlstm.sampling import SamplingParams
    from fastxlstm.serving.prefix_cache import PrefixCache
    from fastxlstm.serving.requests import GenerationRequest
    from fastxlstm.serving.scheduler import Scheduler
    from fastxlstm.state import clone_state

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    dt = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype] if cuda else \
        torch.float32
    torch.set_grad_enabled(False)
    model = load(model_spec, device=dev, dtype=dt, weight_mode="fused")
    be = EngineSlotBackend(model, slots)
    be.engine.warmup([slots])
    out: dict = {}
    t0 = time.perf_counter()
    out["prefill_graph_buckets"] = len(be.capture_prefill_graphs(budget))
    out["prefill_graph_capture_s"] = time.perf_counter() - t0
    rng = random.Random(0)
    mid = (min_p + max_p) // 2
    ps = [[rng.randrange(3, 259) for _ in range(rng.randint(mid - mid // 8, mid + mid // 8))] for _ in range(8)]
    out["prompt_lengths"] = [len(p) for p in ps]
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def timed(fn, reps: int = 3) -> dict:
        fn()  # warm-up (compiles)
        host, total = [], []
        for _ in range(reps):
            sync()
            t0 = time.perf_counter()
            fn()
            t1 = time.perf_counter()
            sync()
            host.append((t1 - t0) * 1000)
            total.append((time.perf_counter() - t0) * 1000)
        return {"host_ms": statistics.median(host), "total_ms": statistics.median(total)}

    def hand_over(n: int) -> None:  # what the scheduler does with a prefilled group
        logits, states = be.prefill_batch(ps[:n], [None] * n)
        for j, st in enumerate(states):
            clone_state(st)  # the prefix-cache insert's copy
            be.load(j, st)
        logits.argmax(-1).tolist()

    # exactness on this device: the padded batch against each prompt alone
    logits, states = be.prefill_batch(ps[:2], [None] * 2)
    worst = {"logits_rel": 0.0, "state_rel": 0.0, "argmax_equal": 0}
    for j, p in enumerate(ps[:2]):
        lone, lone_state = be.prefill(p, None)
        worst["logits_rel"] = max(worst["logits_rel"], ((logits[j] - lone).norm() / lone.norm()).item())
        worst["argmax_equal"] += int(logits[j].argmax() == lone.argmax())
        for layer, lone_layer in zip(states[j], lone_state):
            for t, w in zip(layer, lone_layer):
                worst["state_rel"] = max(worst["state_rel"], ((t - w).float().norm() / w.float().norm().clamp_min(
                    1e-30)).item())
    out["padded_vs_alone"] = worst
    out["prefill_2_one_by_one"] = timed(lambda: [be.prefill(p, None) for p in ps[:2]])
    out["prefill_2_batched"] = timed(lambda: be.prefill_batch(ps[:2], [None] * 2))
    out["hand_over_2"] = timed(lambda: hand_over(2))
    _, st = be.prefill(ps[0], None)
    for s in range(slots):
        be.load(s, st)
    be.first_tokens(list(range(slots)), torch.zeros(slots, be.vocab_size, device=dev))
    out["window_4_steps_all_slots"] = timed(lambda: be.decode_window(list(range(slots)), 4))

    # the scheduler loop itself (no HTTP): a wave of greedy requests with logprobs=0 as the load test sends
    sched = Scheduler(be, eos_token_id=None, cache=PrefixCache(1 << 30), decode_steps_per_read=4,
                      prefill_chunk=budget)

    def wave(seed: int, n: int = 24) -> dict:
        r = random.Random(seed)
        reqs = [GenerationRequest([r.randrange(3, 259) for _ in range(r.randint(min_p, max_p))],
                                  SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True, logprobs=0))
                for _ in range(n)]
        sched.waiting.extend(reqs)
        sched.prof.seconds.clear()
        sched.prof.restart()
        t0 = time.perf_counter()
        iterations = 0
        while sched.has_work():
            sched.step()
            sched.outbox.pending.clear()  # no clients here
            iterations += 1
        sync()
        return {"requests": n, "iterations": iterations, "wall_s": time.perf_counter() - t0,
                "seconds": dict(sched.prof.seconds)}

    wave(1)  # warm-up
    out["scheduler_wave"] = wave(2)
    if cuda:  # where the backend's and the scheduler's calls wait for the device
        torch.cuda.set_sync_debug_mode(1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            be.prefill(ps[0], None)
            hand_over(2)
            tokens = be.decode_window(list(range(slots)), 4).tokens
            tokens.to("cpu", non_blocking=True)
            marker = len(caught)
            wave(3, n=12)
        torch.cuda.set_sync_debug_mode(0)
        for key, part in (("synchronising_calls", caught[:marker]), ("scheduler_synchronising_calls", caught[marker:])):
            where: dict[str, int] = {}
            for w in part:
                k = f"{Path(w.filename).name}:{w.lineno}: {str(w.message).splitlines()[0][:60]}"
                where[k] = where.get(k, 0) + 1
            out[key] = where
    return out


# ----------------------------------------------------------------------------------------- the client
async def stream_one(client: httpx.AsyncClient, path: str, body: dict) -> dict:
    t0 = time.perf_counter()
    times: list[float] = []  # arrival of each chunk that carries tokens
    counts: list[int] = []  # tokens in that chunk (its logprobs entries; 1 without logprobs)
    usage = None
    async with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            return {"error": r.status_code, "body": (await r.aread()).decode()[:200]}
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            obj = json.loads(data)
            if "error" in obj:
                return {"error": obj["error"]}
            if obj.get("usage"):
                usage = obj["usage"]
            for ch in obj.get("choices", []):
                delta = ch.get("text") or (ch.get("delta") or {}).get("content")
                lp = ch.get("logprobs")
                if lp or delta:
                    times.append(time.perf_counter())
                    counts.append(len(lp.get("tokens") or lp.get("content") or [None]) if lp else 1)
    t1 = time.perf_counter()
    return {"start": t0, "end": t1, "times": times, "counts": counts, "usage": usage}


def make_prompts(n: int, min_p: int, max_p: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyz     ,.ETAOINSHRDLU"
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(min_p, max_p))) for _ in range(n)]


async def run_requests(base: str, model: str, prompts: list[str], concurrency: int, out_tokens: int,
                       extra: dict | None = None) -> list[dict]:
    """Stream one completion per prompt, ``concurrency`` at a time; raw timings per request."""
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
        async def one(p: str) -> dict:
            async with sem:
                return await stream_one(client, "/v1/completions", {
                    "model": model, "prompt": p, "max_tokens": out_tokens, "temperature": 0, "stream": True,
                    "ignore_eos": True, "logprobs": 0, "stream_options": {"include_usage": True}, **(extra or {})})

        return list(await asyncio.gather(*(one(p) for p in prompts)))


def _client_shard(job: tuple) -> list[dict]:
    """(Runs in a client process.) Wait for the common start time, then run this shard's requests."""
    base, model, prompts, concurrency, out_tokens, extra, start_at = job
    time.sleep(max(0.0, start_at - time.perf_counter()))  # perf_counter is CLOCK_MONOTONIC: one clock for all
    return asyncio.run(run_requests(base, model, prompts, concurrency, out_tokens, extra))


async def load_test(base: str, model: str, n: int, concurrency: int, min_p: int, max_p: int, out_tokens: int,
                    seed: int = 0, procs: int = 1, extra: dict | None = None) -> dict:
    """``n`` streaming requests, ``concurrency`` at a time, from ``procs`` client processes (request i goes to
    process i mod procs, each with its share of the concurrency), so the client's own CPU is no limit."""
    prompts = make_prompts(n, min_p, max_p, seed)
    if procs <= 1:
        t0 = time.perf_counter()
        results = await run_requests(base, model, prompts, concurrency, out_tokens, extra)
        wall = time.perf_counter() - t0
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        start_at = time.perf_counter() + 3.0
        jobs = [(base, model, prompts[i::procs], max(1, concurrency // procs), out_tokens, extra, start_at)
                for i in range(procs)]
        with ProcessPoolExecutor(procs, mp_context=mp.get_context("spawn")) as pool:
            shards = await asyncio.get_running_loop().run_in_executor(None, lambda: list(pool.map(_client_shard, jobs)))
        results = [r for shard in shards for r in shard]
        ok_r = [r for r in results if "error" not in r]
        wall = max(r["end"] for r in ok_r) - start_at if ok_r else float("nan")
    errors = [r for r in results if "error" in r]
    ok = [r for r in results if "error" not in r]
    out_tok = sum(r["usage"]["completion_tokens"] for r in ok)
    in_tok = sum(r["usage"]["prompt_tokens"] for r in ok)
    ttft = [r["times"][0] - r["start"] for r in ok if r["times"]]
    # ITL: between two chunks as the client sees them (a chunk holds a decode window's tokens); TPOT: per
    # token after the first chunk
    itl = [b - a for r in ok for a, b in zip(r["times"], r["times"][1:])]
    tpot = [(r["times"][-1] - r["times"][0]) / sum(r["counts"][1:]) for r in ok if sum(r["counts"][1:]) > 0]
    chunk_tokens = [n for r in ok for n in r["counts"]]
    e2e = [r["end"] - r["start"] for r in ok]
    return {"requests": n, "concurrency": concurrency, "client_procs": procs, "errors": len(errors),
            "error_samples": errors[:3],
            "wall_s": wall, "prompt_tokens": in_tok, "completion_tokens": out_tok,
            "output_tokens_per_s": out_tok / wall, "total_tokens_per_s": (in_tok + out_tok) / wall,
            "requests_per_s": len(ok) / wall, "ttft_ms": summary(ttft), "itl_ms": summary(itl),
            "tpot_ms": summary(tpot), "tokens_per_chunk": sum(chunk_tokens) / max(1, len(chunk_tokens)),
            "e2e_s": summary(e2e, 1.0)}


async def prefix_test(base: str, model: str, system_tokens: int, n: int, concurrency: int) -> dict:
    rng = random.Random(1)
    system = "".join(rng.choice("abcdefghij klmnop") for _ in range(system_tokens))
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        async def ask(i: int) -> dict:
            body = {"model": model, "messages": [{"role": "system", "content": system},
                                                 {"role": "user", "content": f"question number {i}?"}],
                    "max_tokens": 16, "temperature": 0, "stream": True, "logprobs": True, "ignore_eos": True,
                    "stream_options": {"include_usage": True}}
            return await stream_one(client, "/v1/chat/completions", body)

        cold = await ask(-1)
        sem = asyncio.Semaphore(concurrency)

        async def warm(i):
            async with sem:
                return await ask(i)

        rest = await asyncio.gather(*(warm(i) for i in range(n)))
    ttft = [r["times"][0] - r["start"] for r in rest if "error" not in r and r["times"]]
    cached = [r["usage"]["prompt_tokens_details"]["cached_tokens"] for r in rest if "error" not in r]
    return {"system_prompt_tokens": cold["usage"]["prompt_tokens"], "cold_ttft_ms": (cold["times"][0] - cold["start"])
            * 1000, "cold_cached_tokens": cold["usage"]["prompt_tokens_details"]["cached_tokens"],
            "warm_requests": n, "warm_concurrency": concurrency, "warm_ttft_ms": summary(ttft),
            "warm_cached_tokens_mean": sum(cached) / max(1, len(cached)),
            "warm_prompt_tokens_mean": sum(r["usage"]["prompt_tokens"] for r in rest if "error" not in r) / max(
                1, len(rest))}


def metrics_snapshot(base: str) -> dict:
    want = ("fastxlstm_prefix_cache_hits_total", "fastxlstm_prefix_cache_misses_total",
            "fastxlstm_prefill_tokens_total", "fastxlstm_prompt_tokens_total", "fastxlstm_generation_tokens_total",
            "fastxlstm_slots_used", "fastxlstm_requests_running", "fastxlstm_scheduler_cpu_seconds_total",
            "fastxlstm_decode_batch_size_count", "fastxlstm_decode_batch_size_sum")
    out = {}
    for line in httpx.get(base + "/metrics").text.splitlines():
        name = line.split(" ")[0]
        if name in want or name.startswith(("fastxlstm_scheduler_loop_seconds_total{", "fastxlstm_startup_seconds{")):
            out[name] = float(line.split(" ")[1])
    return out


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> list[int]:
    """The live child processes of ``pid`` (e.g. the server's scheduler process), from /proc."""
    out: list[int] = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            out += [int(c) for c in children.read_text().split()]
        except OSError:
            pass
    return out


def server_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds of the server process and of each of its children (a process that ended is left out)."""
    out = {}
    for p in [pid, *child_pids(pid)]:
        try:
            out[p] = process_cpu_s(p)
        except OSError:
            pass
    return out


def loop_profile(before: dict, after: dict, wall: float, tokens: int) -> dict:
    """Where the scheduler thread spent the load test: seconds and share of wall time per phase."""
    phases = {}
    for k, v in after.items():
        if k.startswith("fastxlstm_scheduler_loop_seconds_total{"):
            phase = k.split('phase="', 1)[1].split('"', 1)[0]
            phases[phase] = v - before.get(k, 0.0)
    # the idle time counted before the clients' common start is not part of the test: idle = wall - busy
    busy = sum(v for k, v in phases.items() if k != "idle")
    phases["idle"] = max(0.0, wall - busy)
    cpu = after.get("fastxlstm_scheduler_cpu_seconds_total", 0.0) - before.get(
        "fastxlstm_scheduler_cpu_seconds_total", 0.0)
    steps = after.get("fastxlstm_decode_batch_size_count", 0.0) - before.get("fastxlstm_decode_batch_size_count", 0.0)
    rows = after.get("fastxlstm_decode_batch_size_sum", 0.0) - before.get("fastxlstm_decode_batch_size_sum", 0.0)
    step_s = phases.get("decode_launch", 0.0) + phases.get("decode_wait", 0.0)
    return {"decode_steps": steps, "mean_decode_batch": rows / steps if steps else float("nan"),
            "decode_ms_per_step": step_s / steps * 1000 if steps else float("nan"), "seconds": phases,
            "share_of_wall": {k: v / wall for k, v in phases.items()} if wall else {},
            "busy_s": busy, "wall_s": wall, "scheduler_thread_cpu_s": cpu,
            "scheduler_cpu_us_per_token": cpu / tokens * 1e6 if tokens else float("nan")}


def run_server(args, variant: str, extra_args: list[str], result: dict, prefix: bool) -> dict:
    """Start ``fastxlstm serve`` with ``extra_args``, load-test it (and the prefix cache), stop it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "fastxlstm", "serve", "--model", args.model, "--port", str(port),
           "--served-model-name", "bench", "--max-slots", str(args.max_slots), "--max-waiting", str(4 * args.requests),
           "--dtype", args.dtype, "--log-level", "warning", "--backend", args.backend, *extra_args]
    out: dict = {"variant": variant, "server_args": extra_args}
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"server exited with {proc.returncode}")
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        out["server_start_s"] = time.perf_counter() - t
        print(f"[{variant}] server up in {out['server_start_s']:.1f}s", flush=True)
        asyncio.run(load_test(base, "bench", 16, 16, args.min_prompt, args.max_prompt, 16, seed=99))  # warm-up
        before, cpu0 = metrics_snapshot(base), server_cpu_s(proc.pid)
        out["startup_s"] = {k.split('phase="', 1)[1].split('"', 1)[0]: v for k, v in before.items()
                            if k.startswith("fastxlstm_startup_seconds{")}
        out["load"] = ld = asyncio.run(load_test(base, "bench", args.requests, args.concurrency, args.min_prompt,
                                                 args.max_prompt, args.output_tokens, procs=args.client_procs))
        after, cpu1 = metrics_snapshot(base), server_cpu_s(proc.pid)
        out["profile"] = loop_profile(before, after, ld["wall_s"], ld["completion_tokens"])
        # the HTTP process, and its children (the scheduler process with --scheduler-process)
        http_cpu = cpu1.get(proc.pid, 0.0) - cpu0.get(proc.pid, 0.0)
        child_cpu = sum(v - cpu0.get(p, 0.0) for p, v in cpu1.items() if p != proc.pid)
        out["profile"]["server_process_cpu_s"] = http_cpu + child_cpu
        out["profile"]["http_process_cpu_s"] = http_cpu
        out["profile"]["child_processes_cpu_s"] = child_cpu
        out["profile"]["server_cpu_us_per_token"] = (http_cpu + child_cpu) / max(1, ld["completion_tokens"]) * 1e6
        print(json.dumps({k: ld[k] for k in ("output_tokens_per_s", "ttft_ms", "itl_ms", "errors")}), flush=True)
        print(json.dumps(out["profile"]), flush=True)
        if args.sampled:  # the same requests, sampled: same server, same run
            temp, top_p = (float(x) for x in args.sampled.split(","))
            out["load_sampled"] = sl = asyncio.run(load_test(
                base, "bench", args.requests, args.concurrency, args.min_prompt, args.max_prompt, args.output_tokens,
                procs=args.client_procs, extra={"temperature": temp, "top_p": top_p}))
            out["sampled_params"] = {"temperature": temp, "top_p": top_p}
            out["sampled_over_greedy"] = sl["output_tokens_per_s"] / ld["output_tokens_per_s"]
            print(json.dumps({k: sl[k] for k in ("output_tokens_per_s", "ttft_ms", "tpot_ms", "errors")}), flush=True)
        if prefix:
            before = metrics_snapshot(base)
            out["prefix_cache"] = asyncio.run(prefix_test(base, "bench", args.system_tokens, 32, 8))
            after = metrics_snapshot(base)
            out["prefix_cache"]["metrics_delta"] = {k: after[k] - before.get(k, 0) for k in after
                                                    if not k.startswith("fastxlstm_scheduler")}
            print(json.dumps(out["prefix_cache"]), flush=True)
        out["metrics_end"] = after
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    if "engine_peer" in result:
        peer = result["engine_peer"]
        out["server_over_engine_decode"] = ld["output_tokens_per_s"] / peer["graph_replay"]["tokens_per_s"]
        if "engine_offline" in peer:
            offline = peer["engine_offline"]["output_tokens_per_s"]
            out["server_over_engine_offline"] = ld["output_tokens_per_s"] / offline
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:xlstm-1.3b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--client-procs", type=int, default=4, help="load-client processes (the client's CPU is no limit)")
    ap.add_argument("--max-slots", type=int, default=64)
    ap.add_argument("--min-prompt", type=int, default=64)
    ap.add_argument("--max-prompt", type=int, default=1024)
    ap.add_argument("--output-tokens", type=int, default=256)
    ap.add_argument("--system-tokens", type=int, default=2000)
    ap.add_argument("--peer-steps", type=int, default=100)
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--skip-audit", action="store_true", help="skip the backend audit (host vs device time, syncs)")
    ap.add_argument("--skip-prefix", action="store_true", help="skip the prefix-cache test (cold vs cached TTFT)")
    ap.add_argument("--audit-only", action="store_true", help=argparse.SUPPRESS)  # the audit's own process
    ap.add_argument("--backend", default="auto", help="the server's mLSTM kernels (auto, triton, reference)")
    ap.add_argument("--sampled", default="", metavar="TEMPERATURE,TOP_P",
                    help="after each greedy load, the same load with these sampling knobs (e.g. 0.8,0.95)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=SERVER ARGS",
                    help="a server configuration to load-test, e.g. 'k1=--decode-steps-per-read 1' (repeatable; "
                         "default: one run with the server's defaults); the first one also runs the prefix test")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.audit_only:
        print(json.dumps(backend_audit(args.model, args.max_slots, args.dtype, args.min_prompt, args.max_prompt)))
        return
    if args.out is None:
        ap.error("--out is required")

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result: dict = {"benchmark": "serving_load", "date": time.strftime("%Y-%m-%d"), "device": device,
                    "command": " ".join([Path(sys.executable).name, *sys.argv]), "model": args.model,
                    "dtype": args.dtype, "max_slots": args.max_slots, "torch": torch.__version__}
    if not args.skip_peer and torch.cuda.is_available():
        t = time.perf_counter()
        try:
            result["engine_peer"] = engine_peer(args.model, args.max_slots, args.peer_steps, args.dtype,
                                                make_prompts(args.requests, args.min_prompt, args.max_prompt),
                                                args.output_tokens)
        except Exception as e:  # record and go on: the server runs all the same
            import traceback

            traceback.print_exc()
            result["engine_peer_error"] = f"{type(e).__name__}: {e}"
        import gc

        gc.collect()
        torch.cuda.empty_cache()
        print(f"peer done in {time.perf_counter() - t:.1f}s: {result.get('engine_peer')}", flush=True)
    if not args.skip_audit:
        t = time.perf_counter()
        cmd = [sys.executable, __file__, "--audit-only", "--model", args.model, "--max-slots", str(args.max_slots),
               "--dtype", args.dtype, "--min-prompt", str(args.min_prompt), "--max-prompt", str(args.max_prompt)]
        proc = subprocess.run(cmd, env={**os.environ, "FASTXLSTM_TRITON_AUTOTUNE": "0"}, capture_output=True,
                              text=True, timeout=300)
        try:
            result["backend_audit"] = json.loads(proc.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            result["backend_audit_error"] = proc.stderr[-2000:]
        print(f"audit done in {time.perf_counter() - t:.1f}s: {json.dumps(result.get('backend_audit'))}"
              f"{proc.stderr[-1500:] if proc.returncode else ''}", flush=True)
    result["backend"] = args.backend
    variants = [v.split("=", 1) if "=" in v else (v, "") for v in args.variant] or [("default", "")]
    result["runs"] = []
    for i, (name, extra) in enumerate(variants):
        try:
            result["runs"].append(run_server(args, name, extra.split(), result, prefix=i == 0 and not args.skip_prefix))
        except Exception as e:  # keep what the other variants measured
            import traceback

            traceback.print_exc()
            result["runs"].append({"variant": name, "error": f"{type(e).__name__}: {e}"})
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result, args)


def print_table(result: dict, args) -> None:
    """One short table: every server run (greedy, and sampled where asked) against the engine offline on the
    same requests and against bare decode graph replay, then each run's scheduler profile in one line."""
    peer = result.get("engine_peer") or {}
    replay = (peer.get("graph_replay") or {}).get("tokens_per_s")
    offline = (peer.get("engine_offline") or {}).get("output_tokens_per_s")
    ratio = lambda v, ref: f"{v / ref:.2f}" if ref else "-"
    print(f"\n{args.model} on {result['device']}: {args.requests} requests x {args.output_tokens} tokens, "
          f"prompts {args.min_prompt}..{args.max_prompt}, {args.concurrency} concurrent, {args.max_slots} slots")
    print(f"| {'run':<34} | out tok/s | x offline | x replay | x greedy | TTFT p50/p99 ms | TPOT p50 ms |")
    print(f"|{'-' * 36}|-----------|-----------|----------|----------|-----------------|-------------|")
    if replay:
        print(f"| {'engine decode graph replay':<34} | {replay:9.0f} | {ratio(replay, offline):>9} | {'1.00':>8} | "
              f"{'-':>8} | {'-':>15} | {'-':>11} |")
    if offline:
        print(f"| {'engine offline (LLM.generate)':<34} | {offline:9.0f} | {'1.00':>9} | {ratio(offline, replay):>8} | "
              f"{'-':>8} | {'-':>15} | {'-':>11} |")
    for run in result["runs"]:
        if "load" not in run:
            print(f"| {run['variant'] + ': failed':<34} | {run.get('error', '')[:80]}")
            continue
        greedy = run["load"]["output_tokens_per_s"]
        for name, ld in (("greedy", run["load"]), ("sampled", run.get("load_sampled"))):
            if ld is None:
                continue
            v = ld["output_tokens_per_s"]
            label = f"server {run['variant']} {name}"
            print(f"| {label:<34} | {v:9.0f} | {ratio(v, offline):>9} | {ratio(v, replay):>8} | "
                  f"{ratio(v, greedy):>8} | {ld['ttft_ms']['p50']:7.0f}/{ld['ttft_ms']['p99']:<7.0f} | "
                  f"{ld['tpot_ms']['p50']:11.2f} |")
    for run in result["runs"]:
        if "load" not in run:
            continue
        pr, ld = run["profile"], run["load"]
        shares = sorted(pr["share_of_wall"].items(), key=lambda kv: -kv[1])
        print(f"  {run['variant']} {run['server_args'] or '(defaults)'}: wall {ld['wall_s']:.2f} s, "
              f"{pr['decode_steps']:.0f} decode steps, mean batch {pr['mean_decode_batch']:.1f}, launch+wait "
              f"{pr['decode_ms_per_step']:.2f} ms/step, server CPU {pr['server_cpu_us_per_token']:.0f} us/token, "
              f"up in {run['server_start_s']:.0f} s; scheduler thread: "
              + ", ".join(f"{k} {v:.0%}" for k, v in shares))

if __name__ == "__main__":
    main()
