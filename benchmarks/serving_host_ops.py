"""The serving scheduler's host work, counted on the CPU: a closed-loop load (``--requests`` prompts of
``--min-prompt``..``--max-prompt`` tokens, ``--concurrency`` at a time, ``--output-tokens`` each, greedy with
``logprobs: 0`` as ``serving_load.py`` sends them) through :class:`~fastxlstm.serving.core.SchedulerCore` over
the engine backend of a tiny model with the 1.3B's 24 blocks, the GPU's prefill-graph buckets emulated
(``PrefillGraphs(capture=False)``; every bucket's buffers are built before the first request, as the server's
warm-up captures its graphs, unless ``--cold-graphs``). It reports what the scheduler asks of the engine
(iterations, prefill calls and their batch sizes, padded tokens, decode windows, steps and mean batch) and the
aten ops run on the host outside what a CUDA graph replays on the GPU (a prefill bucket's forward, a decode
step: one launch each), per decode step and per prompt by phase (on the CPU the decode step function is rebuilt
for every window, 72 views for the 24 blocks, about 18 ops per step of a 4-step window that a GPU's cached
graph does not run). No GPU needed; minutes on a small CPU.

    PYTHONPATH=src python benchmarks/serving_host_ops.py --max-num-batched-tokens 8192
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter, defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from fastxlstm.config import XLSTMConfig
from fastxlstm.engine import engine as engine_module
from fastxlstm.engine.backend import EngineSlotBackend
from fastxlstm.engine.prefill_graph import PrefillGraphs, _Graph
from fastxlstm.model import XLSTMForCausalLM
from fastxlstm.sampling import SamplingParams
from fastxlstm.serving.core import SchedulerCore
from fastxlstm.serving.prefix_cache import PrefixCache
from fastxlstm.serving.requests import GenerationRequest


class HostOps(TorchDispatchMode):
    """Counts aten ops per phase; :meth:`as_one` makes a function count as one launch (a graph replay)."""

    def __init__(self):
        super().__init__()
        self.phase, self.ops = "other", Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[self.phase] += 1
        return func(*args, **(kwargs or {}))

    def as_one(self, fn):
        def replay(*a, **k):
            self.ops[self.phase] += 1
            with _disable_current_modes():
                return fn(*a, **k)
        return replay

    def phased(self, obj, name: str, phase: str) -> None:
        fn = getattr(obj, name)

        def wrapper(*a, **k):
            old, self.phase = self.phase, phase
            try:
                return fn(*a, **k)
            finally:
                self.phase = old
        setattr(obj, name, wrapper)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--max-slots", type=int, default=64)
    ap.add_argument("--output-tokens", type=int, default=128)
    ap.add_argument("--min-prompt", type=int, default=64)
    ap.add_argument("--max-prompt", type=int, default=512)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--decode-steps-per-read", type=int, default=4)
    ap.add_argument("--prefill-pad-ratio", type=float, default=1.3)
    ap.add_argument("--cold-graphs", action="store_true",
                    help="build each prefill bucket's buffers inside the first prompt that needs it (counted there) "
                         "instead of before the first request, as the server's warm-up captures them")
    ap.add_argument("--out", help="write the JSON here too")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    cfg = XLSTMConfig(vocab_size=512, embedding_dim=32, num_blocks=24, num_heads=2, weight_mode="fused",
                      chunk_size=64)
    model = XLSTMForCausalLM(cfg).eval()
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randint(args.min_prompt, args.max_prompt))]
               for _ in range(args.requests)]
    ops = HostOps()
    _Graph.replay = ops.as_one(_Graph.replay)
    step_fn = engine_module.Engine._step_fn
    engine_module.Engine._step_fn = lambda self, b, m: ops.as_one(step_fn(self, b, m))
    be = EngineSlotBackend(model, args.max_slots)
    be.engine.runner.prefill_graphs = PrefillGraphs(be.engine.runner, capture=False)
    if not args.cold_graphs:  # what warm_prefill does before the server's first request (here: no forward)
        be.capture_prefill_graphs(args.max_num_batched_tokens)
    calls: dict[str, list] = defaultdict(list)
    for name, size in (("prefill", lambda a: len(a[0])), ("prefill_batch", lambda a: [len(t) for t in a[0]]),
                       ("decode_window", lambda a: (len(a[0]), a[1]))):
        def wrapper(*a, _fn=getattr(be, name), _name=name, _size=size, **k):
            calls[_name].append(_size(a))
            return _fn(*a, **k)
        setattr(be, name, wrapper)
    core = SchedulerCore(be, None, PrefixCache(2 << 30), prefill_chunk=args.max_num_batched_tokens,
                         decode_steps_per_read=args.decode_steps_per_read, prefill_pad_ratio=args.prefill_pad_ratio)
    for name in ("prefill", "prefill_batch", "load", "first_tokens"):
        ops.phased(be, name, "prefill." + name)
    ops.phased(core.cache, "insert", "prefill.cache_insert")
    for name, phase in (("_admit", "admit"), ("_prefill", "prefill"), ("_launch_window", "decode_launch"),
                        ("_finish_window", "read_emit")):
        ops.phased(core, name, phase)
    reqs = [GenerationRequest(p, SamplingParams(max_new_tokens=args.output_tokens, temperature=0, ignore_eos=True,
                                                logprobs=0)) for p in prompts]
    live, nxt = reqs[:args.concurrency], args.concurrency
    core.waiting.extend(live)
    iterations = with_prefill = 0
    t0 = time.perf_counter()
    with ops:
        while core.has_work() or nxt < len(reqs):
            before = len(calls["prefill"]) + len(calls["prefill_batch"])
            core.step()
            core.outbox.pending.clear()  # no clients here
            iterations += 1
            with_prefill += len(calls["prefill"]) + len(calls["prefill_batch"]) > before
            for r in [r for r in live if r.finished]:  # a closed loop: each finished request makes room for one
                live.remove(r)
                if nxt < len(reqs):
                    live.append(reqs[nxt])
                    core.waiting.append(reqs[nxt])
                    nxt += 1
    batches, singles, windows = calls["prefill_batch"], calls["prefill"], calls["decode_window"]
    steps = sum(s for _, s in windows)
    n = len(reqs)
    out = {"benchmark": "serving_host_ops", "date": time.strftime("%Y-%m-%d"), "device": "cpu",
           "args": vars(args), "iterations": iterations, "iterations_with_prefill": with_prefill,
           "prefill_calls": len(batches) + len(singles), "prompts_per_prefill_call": n / (len(batches) + len(singles)),
           "prefill_batch_sizes": dict(sorted(Counter(len(b) for b in batches).items())),
           "single_prefills": len(singles),
           "prompt_tokens": sum(map(len, prompts)),
           "device_prefill_tokens": sum(be.prefill_cost(len(b), max(b)) for b in batches)
           + sum(be.prefill_cost(1, x) for x in singles),
           "decode_windows": len(windows), "decode_steps": steps,
           "mean_decode_batch": sum(r * s for r, s in windows) / steps,
           "host_ops_per_decode_step": ops.ops["decode_launch"] / steps,
           "host_ops_per_prompt": {k: v / n for k, v in sorted(ops.ops.items()) if k.startswith("prefill")},
           "host_ops_per_window_read": ops.ops["read_emit"] / len(windows), "cpu_wall_s": time.perf_counter() - t0}
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
