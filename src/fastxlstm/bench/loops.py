"""The measurement loops every system shares: TTFT, batched prefill, decode on static buffers (CUDA
graph), generation, and the energy of each row. A system supplies callables; these time them the
same way for everyone."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .common import (
    GB,
    Plan,
    Recorder,
    free_memory,
    is_oom,
    on_cuda,
    peak_gb,
    reset_peak,
    seeded_tokens,
    sync,
    timed,
)
from .energy import calls_for


def failed(rec: Recorder, what: str, exc: BaseException) -> bool:
    """Record a failed measurement and free memory; True (stop the loop) unless it ran out of memory."""
    rec.error(what, exc)
    free_memory()
    return not is_oom(exc)


def weights_gb(model: torch.nn.Module) -> float:
    seen = {}
    for p in model.parameters():
        seen[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
    return sum(seen.values()) / GB


def decode_timing(step: Callable[[], Any], steps: int, warmup: int = 3) -> float:
    """ms per step over ``steps`` back-to-back steps (CUDA events on a GPU, the host clock on a CPU)."""
    for _ in range(warmup):
        step()
    sync()
    if not on_cuda():
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        return (time.perf_counter() - t0) * 1e3 / steps
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        step()
    end.record()
    sync()
    return start.elapsed_time(end) / steps


def energy(rec: Recorder, fn: Callable[[], Any], seconds_per_call: float, tokens_per_call: int,
           what: str) -> dict[str, Any]:
    """Joules per token of ``fn`` (a region of at least ``plan.energy_s`` seconds of back-to-back calls)
    as row fields; empty when no meter is open. A failure is recorded, never fatal."""
    if rec.meter is None or rec.energy_s <= 0:
        return {}
    try:
        reading = rec.meter.region(fn, calls_for(seconds_per_call, rec.energy_s), sync=sync)
        return reading.per_token(tokens_per_call)
    except Exception as e:  # noqa: BLE001
        rec.error(f"energy {what}", e)
        return {}


def ttft_loop(plan: Plan, rec: Recorder, prefill: Callable, vocab: int, wgb: float, max_len: int | None = None,
              repeats: int = 3) -> None:
    """TTFT (prefill + first greedy token, batch 1) and peak memory for each prompt length.

    The allocator cache is emptied once per length, then the prompt runs ``repeats`` times: the first
    run pays the allocator's fresh cudaMalloc calls (and fastxlstm's capture of the length's prefill graph,
    which a server does at start-up; recorded as ``ms_first``), the best run (``ms``) is what a
    long-running process sees. Energy: joules per prefilled token over further calls."""
    if not plan.prompt_lengths:
        return
    try:
        prefill(seeded_tokens(min(256, min(plan.prompt_lengths)), vocab))  # compile / autotune outside the timings
    except Exception as e:  # noqa: BLE001
        rec.error("ttft warm-up", e)
        return
    for n in plan.prompt_lengths:
        if max_len is not None and n > max_len:
            rec.data["errors"].append({"what": f"ttft {n}", "error": f"skipped: above this system's limit {max_len}"})
            continue
        if rec.out_of_time(f"ttft {n}", need_s=5 + n / 4000):
            break
        ids = seeded_tokens(n, vocab, seed=n)
        times, peaks = [], []
        try:
            free_memory()
            for _ in range(repeats):
                reset_peak()
                t, _ = timed(lambda ids=ids: prefill(ids))
                times.append(t)
                peaks.append(peak_gb())
            peak = max(peaks) if on_cuda() else float("nan")
            row = energy(rec, lambda ids=ids: prefill(ids), min(times), n, f"ttft {n}")
            rec.add("ttft", prompt_len=n, ms=min(times) * 1e3, ms_first=times[0] * 1e3, peak_gb=peak,
                    weights_gb=wgb, **row)
        except Exception as e:  # noqa: BLE001
            if failed(rec, f"ttft {n}", e):
                break


def prefill_loop(plan: Plan, rec: Recorder, prefill: Callable, vocab: int, max_tokens: int | None = None) -> None:
    """Prefill throughput at each (batch, length) of ``plan.prefill_shapes``: ``prefill(ids [b, s])``
    keeps each row's state (as a server does). Two runs per shape, the second is reported (the first
    pays autotuning and allocation: ``ms_first``)."""
    for b, s in plan.prefill_shapes:
        what = f"prefill {b}x{s}"
        if max_tokens is not None and b * s > max_tokens:
            rec.data["errors"].append({"what": what, "error": f"skipped: above this system's limit {max_tokens}"})
            continue
        if rec.out_of_time(what, need_s=5 + b * s / 4000):
            break
        ids = seeded_tokens(s, vocab, batch=b, seed=b * s + b)
        try:
            free_memory()
            reset_peak()
            t_first, _ = timed(lambda ids=ids: prefill(ids))
            t, _ = timed(lambda ids=ids: prefill(ids))
            row = energy(rec, lambda ids=ids: prefill(ids), t, b * s, what)
            rec.add("prefill", batch=b, prompt_len=s, ms=t * 1e3, ms_first=t_first * 1e3, tok_s=b * s / t,
                    peak_gb=peak_gb(), **row)
        except Exception as e:  # noqa: BLE001
            if failed(rec, what, e):
                break


@dataclass
class StaticDecoder:
    """One greedy decode step on static buffers, for peers without an engine: ``step()`` reads ``tok``
    [b, 1] and the recurrent state and writes both in place (so it can be captured as a CUDA graph);
    ``reset(ids)`` prefills ``ids`` [b, n] into that state and puts the first greedy token in ``tok``."""

    step: Callable[[], None]
    reset: Callable[[torch.Tensor], None]
    tok: torch.Tensor


def _replayable(dec: StaticDecoder):
    if not on_cuda():
        return dec.step
    from ..engine.cuda_graph import capture_graph

    g, _ = capture_graph(dec.step, warmup=3)
    return g.replay


def _greedy_run(dec: StaticDecoder, run: Callable[[], None], prompt: torch.Tensor, n: int) -> list:
    dec.reset(prompt)
    out = [dec.tok.clone()]
    for _ in range(n - 1):
        run()
        out.append(dec.tok.clone())
    return torch.cat(out, 1).tolist()


def static_decode(plan: Plan, rec: Recorder, make: Callable[[int], StaticDecoder], vocab: int,
                  batches: list[int] | None = None, check_steps: int = 16) -> None:
    """Decode rows (ms/step, tok/s, J/token at each batch size; the step replayed from a CUDA graph on a
    GPU), the graph-vs-eager token check at batch 4, and the batch-1 generation rows (time, peak memory,
    J/token to generate N tokens after a 16-token prompt)."""
    for b in plan.batch_sizes if batches is None else batches:
        if rec.out_of_time(f"decode {b}", need_s=15):
            break
        try:
            dec = make(b)
            run = _replayable(dec)
            dec.reset(seeded_tokens(plan.decode_prompt, vocab, batch=b))
            ms = decode_timing(run, plan.decode_steps)
            row = energy(rec, run, ms / 1e3, b, f"decode {b}")
            rec.add("decode", batch=b, ms_per_step=ms, tok_s=b * 1e3 / ms, **row)
            if b == min(4, max(plan.batch_sizes)) and on_cuda():
                prompt = seeded_tokens(plan.decode_prompt, vocab, batch=b, seed=1)
                rec.set("graph_equals_eager", _greedy_run(dec, run, prompt, check_steps)
                        == _greedy_run(dec, dec.step, prompt, check_steps))
            del dec, run
            free_memory()
        except Exception as e:  # noqa: BLE001
            if failed(rec, f"decode {b}", e):
                break
    if not plan.generate_lengths:
        return
    try:
        dec = make(1)
        run = _replayable(dec)
        prompt = seeded_tokens(16, vocab)
        for n in plan.generate_lengths:
            if rec.out_of_time(f"generate {n}", need_s=n / 60):
                break
            reset_peak()
            t, row = measured(rec, lambda n=n: _greedy_run(dec, run, prompt, n), n, f"generate {n}")
            rec.add("generate", prompt_len=16, new_tokens=n, s=t, tok_s=n / t, peak_gb=peak_gb(), **row)
    except Exception as e:  # noqa: BLE001
        rec.error("generate", e)


def measured(rec: Recorder, fn: Callable[[], Any], tokens: int, what: str) -> tuple[float, dict[str, Any]]:
    """Seconds of one call of ``fn`` (long: a whole generation) and, with a meter, its energy from the
    same call."""
    if rec.meter is None or rec.energy_s <= 0:
        t, _ = timed(fn)
        return t, {}
    try:
        reading = rec.meter.region(fn, 1, sync=sync)
    except Exception as e:  # noqa: BLE001
        rec.error(f"energy {what}", e)
        t, _ = timed(fn)
        return t, {}
    return reading.seconds, reading.per_token(tokens)
