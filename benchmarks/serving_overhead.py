"""Serving-stack overhead without a GPU: the server with a stand-in engine whose decode step takes
--step-ms with the GIL released (as a GPU wait does) and costs nothing else.

The peer is that stand-in's own ceiling, ``slots / step`` tokens/s; the ratio server/peer is the share
of engine throughput that the HTTP layer, the scheduler and detokenisation leave. The load client
(``benchmarks/serving_load.py``'s) runs in a separate process.

    PYTHONPATH=src python benchmarks/serving_overhead.py --out benchmarks/results/serving_overhead_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from serving_load import process_cpu_s  # (benchmarks/, this script's folder)

from fastxlstm.engine.backend import Sampled
from fastxlstm.sampling import MAX_LOGPROBS
from fastxlstm.serving.app import create_app
from fastxlstm.serving.runtime import ServeConfig
from fastxlstm.serving.testing import ServerThread
from fastxlstm.serving.worker import WorkerSpec
from fastxlstm.tokenizer import Tokenizer


class SimulatedEngine:
    """A :class:`~fastxlstm.serving.slots.SlotBackend` whose steps only wait (GIL released)."""

    def __init__(self, max_slots: int, step_s: float, prefill_token_s: float, vocab: int = 512):
        self.max_slots, self.vocab_size, self.device = max_slots, vocab, torch.device("cpu")
        self.step_s, self.prefill_token_s = step_s, prefill_token_s
        self.table = torch.randn(512, vocab, generator=torch.Generator().manual_seed(0))
        self.state = [(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4), torch.zeros(1, 2))]
        self.last = torch.zeros(max_slots, dtype=torch.long)  # each slot's last sampled token

    def prefill(self, tokens, state):
        time.sleep(self.prefill_token_s * len(tokens))
        return self.table[len(tokens) % 512], self.state

    def prefill_batch(self, tokens, states):  # one call, cost still proportional to all its tokens
        time.sleep(self.prefill_token_s * sum(map(len, tokens)))
        return self.table[len(tokens[0]) % 512].expand(len(tokens), -1), [self.state] * len(tokens)

    def first_tokens(self, slots, logits, logprobs=False):
        tok = logits.argmax(-1)  # the argmax stands in for on-device sampling
        self.last[list(slots)] = tok
        return self._sampled(tok[:, None], logits[:, None], logprobs)

    def decode_window(self, slots, steps, logprobs=False):
        """``steps`` steps queued back to back (as CUDA launches are): one wait of ``steps`` step times."""
        time.sleep(self.step_s * steps)
        out, rows, tok = [], [], self.last[list(slots)]
        for _ in range(steps):
            logits = self.table.index_select(0, tok % 512)
            tok = logits.argmax(-1)
            out.append(tok)
            rows.append(logits)
        self.last[list(slots)] = tok
        return self._sampled(torch.stack(out, 1), torch.stack(rows, 1), logprobs)

    @staticmethod
    def _sampled(tokens, logits, logprobs):
        if not logprobs:
            return Sampled(tokens)
        lsm = torch.log_softmax(logits, -1)
        top = lsm.topk(MAX_LOGPROBS, -1)
        return Sampled(tokens, lsm.gather(2, tokens[..., None])[..., 0], top.values, top.indices)

    def load(self, slot, state, params=None, history=()):
        pass

    def read(self, slot):
        return self.state

    def release(self, slot):
        pass


def simulated_engine(max_slots: int, step_s: float, prefill_token_s: float, plain: bool, threads: int):
    """The stand-in as the scheduler process builds it (``--scheduler-process``)."""
    torch.set_num_threads(threads)
    engine = SimulatedEngine(max_slots, step_s, prefill_token_s)
    return _Plain(engine) if plain else engine


class _Plain:
    """The stand-in without its optional batched methods."""

    def __init__(self, inner: SimulatedEngine):
        self._inner = inner
        self.max_slots, self.vocab_size, self.device = inner.max_slots, inner.vocab_size, inner.device
        self.prefill, self.load, self.read = inner.prefill, inner.load, inner.read
        self.release, self.first_tokens, self.decode_window = inner.release, inner.first_tokens, inner.decode_window


def scheduler_only(args) -> None:
    """All requests submitted at once to a bare Scheduler (prompts 8-64 random tokens, greedy, logprobs=0)."""
    import asyncio
    import random

    from fastxlstm.sampling import SamplingParams
    from fastxlstm.serving.requests import FinishEvent, GenerationRequest
    from fastxlstm.serving.scheduler import Scheduler

    backend = SimulatedEngine(args.slots, args.step_ms / 1000, args.prefill_us_per_token / 1e6)
    if args.no_batching:
        backend = _Plain(backend)
    kw = {} if args.decode_steps_per_read is None else {"decode_steps_per_read": args.decode_steps_per_read}
    sched = Scheduler(backend, eos_token_id=None, max_waiting=4 * args.requests, prefill_chunk=2048, **kw)
    rng = random.Random(0)
    reqs = [GenerationRequest([rng.randrange(1, 256) for _ in range(rng.randint(8, 64))],
                              SamplingParams(max_new_tokens=args.output_tokens, temperature=0, logprobs=0,
                                             ignore_eos=True))
            for _ in range(args.requests)]

    async def run() -> None:
        queue: asyncio.Queue = asyncio.Queue()
        sched.submit(reqs, asyncio.get_running_loop(), queue)
        left = len(reqs)
        while left:
            _, events = await queue.get()
            left -= sum(type(e) is FinishEvent for e in events)

    sched.start()
    c0, t0 = time.process_time(), time.perf_counter()
    asyncio.run(run())
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    sched.shutdown()
    tokens = args.requests * args.output_tokens
    peer = args.slots / (args.step_ms / 1000)
    result = {"benchmark": "serving_overhead/scheduler_only", "date": time.strftime("%Y-%m-%d"),
              "device": f"CPU only ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
                        "simulated engine step", "command": " ".join(["python", *sys.argv]),
              "step_ms": args.step_ms, "slots": args.slots, "requests": args.requests,
              "output_tokens": args.output_tokens, "decode_steps_per_read": args.decode_steps_per_read,
              "no_batching": args.no_batching, "peer_tokens_per_s": peer, "tokens_per_s": tokens / wall,
              "server_over_peer": tokens / wall / peer, "decode_steps": sched.steps,
              "server_cpu_us_per_token": cpu / tokens * 1e6, "wall_s": wall}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"scheduler only: {tokens / wall:.0f} tok/s vs simulated engine {peer:.0f} tok/s "
          f"({result['server_over_peer']:.2f}); {sched.steps} steps; "
          f"CPU {result['server_cpu_us_per_token']:.0f} us/token")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--step-ms", type=float, default=5.0)
    ap.add_argument("--prefill-us-per-token", type=float, default=10.0)
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--output-tokens", type=int, default=128)
    ap.add_argument("--stream-interval-ms", type=float, default=0.0, help="ServeConfig.stream_interval_ms")
    ap.add_argument("--decode-steps-per-read", type=int, default=None,
                    help="ServeConfig.decode_steps_per_read (default: the server's)")
    ap.add_argument("--no-batching", action="store_true",
                    help="hide the stand-in's prefill_batch (one prompt per prefill call)")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="intra-op threads for the host-side tensor ops (on a GPU these run on the device; on a "
                         "2-core box extra OpenMP workers spin against the load client)")
    ap.add_argument("--scheduler-only", action="store_true",
                    help="drive the scheduler directly (no HTTP, no client process): what the scheduler alone leaves")
    ap.add_argument("--scheduler-process", action="store_true",
                    help="ServeConfig.scheduler_process: the scheduler (and the stand-in) in a worker process")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.torch_threads)
    if args.scheduler_only:
        return scheduler_only(args)

    if args.scheduler_process:
        backend = WorkerSpec(simulated_engine, (args.slots, args.step_ms / 1000, args.prefill_us_per_token / 1e6,
                                                args.no_batching, args.torch_threads), backend=True)
    else:
        backend = SimulatedEngine(args.slots, args.step_ms / 1000, args.prefill_us_per_token / 1e6)
        if args.no_batching:
            backend = _Plain(backend)
    extra = {"stream_interval_ms": args.stream_interval_ms} if args.stream_interval_ms else {}
    if args.decode_steps_per_read is not None:
        extra["decode_steps_per_read"] = args.decode_steps_per_read
    app = create_app(backend, Tokenizer.byte_level(),
                     ServeConfig(model_name="bench", max_slots=args.slots, max_waiting=4 * args.requests,
                                 # only when set, so the script also runs against code from before the options
                                 **extra))
    bench_dir = Path(__file__).resolve().parent
    with ServerThread(app) as srv:
        worker = getattr(app.state.server.scheduler, "pid", None)  # the scheduler process, if any
        w0 = process_cpu_s(worker) if worker else 0.0
        c0, t0 = time.process_time(), time.perf_counter()
        k0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = subprocess.run([sys.executable, "-c", (
            f"import asyncio, json, sys; sys.path.insert(0, {str(bench_dir)!r}); from serving_load import load_test; "
            f"print(json.dumps(asyncio.run(load_test({srv.base_url!r}, 'bench', {args.requests}, {args.slots}, "
            f"8, 64, {args.output_tokens}))))")], check=True, capture_output=True, text=True).stdout
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
        k1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        worker_cpu = process_cpu_s(worker) - w0 if worker else 0.0
    client_cpu = (k1.ru_utime + k1.ru_stime) - (k0.ru_utime + k0.ru_stime)
    load = json.loads(out.strip().splitlines()[-1])
    peer = args.slots / (args.step_ms / 1000)
    result = {
        "benchmark": "serving_overhead", "date": time.strftime("%Y-%m-%d"),
        "device": f"CPU only ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
                  "simulated engine step", "command": " ".join(["python", *sys.argv]),
        "step_ms": args.step_ms, "torch_threads": args.torch_threads,
        "stream_interval_ms": args.stream_interval_ms, "slots": args.slots,
        "decode_steps_per_read": args.decode_steps_per_read, "no_batching": args.no_batching,
        "peer_tokens_per_s": peer, "load": load,
        "server_over_peer": load["output_tokens_per_s"] / peer,
        "scheduler_process": args.scheduler_process,
        "server_cpu_us_per_token": (cpu + worker_cpu) / load["completion_tokens"] * 1e6,
        "http_process_cpu_s": cpu, "scheduler_process_cpu_s": worker_cpu,
        "client_cpu_us_per_token": client_cpu / load["completion_tokens"] * 1e6, "wall_s": wall,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{load['output_tokens_per_s']:.0f} tok/s vs simulated engine {peer:.0f} tok/s "
          f"({result['server_over_peer']:.2f}); TTFT p50 {load['ttft_ms']['p50']:.0f} ms, "
          f"ITL p50 {load['itl_ms']['p50']:.1f} ms p99 {load['itl_ms']['p99']:.1f} ms; "
          f"server CPU {result['server_cpu_us_per_token']:.0f} us/token, "
          f"client CPU {result['client_cpu_us_per_token']:.0f} us/token")


if __name__ == "__main__":
    main()
