"""Structured-output throughput vs unconstrained, in one run: the server (the real engine and scheduler) under
``--batch`` concurrent streamed chat requests of ``--max-tokens`` sampled tokens each, first without a constraint
(``ignore_eos``, so every answer runs to the limit), then with a JSON schema whose shortest valid answer is
longer than the limit (EOS stays disallowed, so every answer runs to the limit too: the same token count). The
ratio constrained / unconstrained of completion tokens per second is the cost of the grammar (bitmask filling
on the host, one decode step per host read, the mask in the sampler). Target: >= 0.9 at batch 32.

    source benchmarks/device_env.sh && python3 benchmarks/structured_gpu.py --out structured_7b_h200.json   # GPU
    PYTHONPATH=src python benchmarks/structured_gpu.py --tiny --out /tmp/structured.json      # CPU dry run

Offline by default: ``random:xlstm-7b`` (the 7B shape, random weights drawn on the device, bf16, CUDA graphs)
with the tokenizer shipped in the repository (``models/xlstm-shakespeare-10m``, 8,192 tokens; the model's
vocabulary is built to the tokenizer's size, as xgrammar needs a vocabulary that matches the logits). The
released 7B's tokenizer has 50k tokens: xgrammar's mask filling costs more per step with it, so the ratio here
is an upper bound for that vocabulary (``--model DIR`` measures a real checkpoint with its own tokenizer).
``--scheduler-process`` runs the scheduler in a worker process (``fastxlstm serve --scheduler-process``).
``--tiny``: the ``xlstm-tiny`` shape on the CPU, 4 requests of 24 tokens, one timed round (a dry run of the
code path, not a figure). Writes ``--out`` (JSON, atomically) and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = {  # at least 200 records: no valid answer fits the token budget, so EOS is never allowed
    "type": "array", "minItems": 200,
    "items": {"type": "object", "additionalProperties": False, "required": ["name", "line", "act"],
              "properties": {"name": {"type": "string", "maxLength": 16}, "line": {"type": "string", "maxLength": 48},
                             "act": {"type": "integer", "minimum": 1, "maximum": 5}}},
}
JSON_START = '[{"'  # how every answer under SCHEMA begins (compact JSON: no free whitespace)


async def _one(client, model: str, i: int, max_tokens: int, constrained: bool) -> tuple[float, float, int, str]:
    """(seconds to the first token, total seconds, completion tokens, text) of one streamed request."""
    extra = {"response_format": {"type": "json_schema", "json_schema": {"name": "cast", "schema": SCHEMA}}} \
        if constrained else {"extra_body": {"ignore_eos": True}}
    t0 = time.perf_counter()
    first, tokens, text = None, 0, []
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": f"List the cast of scene {i}."}], max_tokens=max_tokens,
        temperature=1.0, seed=i, stream=True, stream_options={"include_usage": True}, **extra)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first if first is not None else time.perf_counter() - t0
            text.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return first or 0.0, time.perf_counter() - t0, tokens, "".join(text)


async def _round(base_url: str, model: str, batch: int, max_tokens: int, constrained: bool) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0, timeout=3600)
    t0 = time.perf_counter()
    out = await asyncio.gather(*(_one(client, model, i, max_tokens, constrained) for i in range(batch)))
    wall = time.perf_counter() - t0
    tokens = sum(t for _, _, t, _ in out)
    await client.close()
    row = {"constrained": constrained, "requests": batch, "completion_tokens": tokens, "wall_s": wall,
           "tokens_per_s": tokens / wall, "ttft_p50_s": statistics.median(f for f, _, _, _ in out),
           "all_at_limit": all(t == max_tokens for _, _, t, _ in out), "sample": out[0][3][:80]}
    if constrained:
        row["all_json"] = all(text.startswith(JSON_START) for _, _, _, text in out)
    return row


def build(args, tok, device: str, dtype: torch.dtype):
    """The model (or, with ``--scheduler-process``, how the worker builds it)."""
    from fastxlstm.bench.common import random_xlstm
    from fastxlstm.checkpoint import load
    from fastxlstm.config import preset
    from fastxlstm.serving.worker import WorkerSpec

    if args.model.startswith("random:"):
        cfg = preset(args.model.split(":", 1)[1], weight_mode="fused", vocab_size=tok.vocab_size)
        fn, fargs, kwargs = random_xlstm, (cfg, device, dtype), {}
    else:
        fn, fargs, kwargs = load, (args.model,), {"device": device, "dtype": dtype, "weight_mode": "fused"}
    return WorkerSpec(fn, fargs, kwargs) if args.scheduler_process else fn(*fargs, **kwargs)


def table(result: dict) -> str:
    rows = [("variant", "tok/s", "TTFT p50 s", "tokens", "wall s")]
    for r in result["rounds"]:
        rows.append(("json_schema" if r["constrained"] else "unconstrained", f"{r['tokens_per_s']:.1f}",
                     f"{r['ttft_p50_s']:.3f}", str(r["completion_tokens"]), f"{r['wall_s']:.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    return "\n".join([f"{result['model']} on {result['device']}, batch {result['batch']}, {result['max_tokens']} "
                      f"tokens each ({result['scheduler']})", *lines,
                      f"ratio (best json_schema / best unconstrained): {result['ratio']:.3f} (target >= "
                      f"{result['target']})"])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:xlstm-7b", help="random:<preset> or a model directory")
    ap.add_argument("--tokenizer", type=Path, default=ROOT / "models" / "xlstm-shakespeare-10m",
                    help="the tokenizer's directory, for random:<preset> models")
    ap.add_argument("--tiny", action="store_true", help="CPU dry run: random:xlstm-tiny, small counts")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2, help="timed rounds per variant (after one warm-up round)")
    ap.add_argument("--scheduler-process", action="store_true", help="the scheduler in a worker process")
    ap.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    args = ap.parse_args(argv)
    if args.tiny:
        args.model = "random:xlstm-tiny"
        args.batch, args.max_tokens, args.repeats = min(args.batch, 4), min(args.max_tokens, 24), 1

    from fastxlstm.bench.common import write_json
    from fastxlstm.serving.app import build_app
    from fastxlstm.serving.runtime import ServeConfig
    from fastxlstm.serving.testing import ServerThread
    from fastxlstm.tokenizer import Tokenizer

    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    tok = Tokenizer.from_dir(args.tokenizer if args.model.startswith("random:") else args.model)
    config = ServeConfig(model_name="bench", max_slots=max(args.batch, 1), max_waiting=4 * args.batch,
                         prefix_cache_bytes=0, request_timeout=None, scheduler_process=args.scheduler_process)
    rounds = []
    with ServerThread(build_app(build(args, tok, device, dtype), tok, config), start_timeout=600) as srv:
        for constrained in (False, True):  # one warm-up round each (graph captures, grammar compile)
            asyncio.run(_round(srv.base_url, "bench", args.batch, args.max_tokens, constrained))
        for _ in range(args.repeats):  # interleaved, so drift hits both alike
            for constrained in (False, True):
                rounds.append(asyncio.run(_round(srv.base_url, "bench", args.batch, args.max_tokens, constrained)))
    best = {c: max(r["tokens_per_s"] for r in rounds if r["constrained"] == c) for c in (False, True)}
    result = {
        "benchmark": "structured_gpu", "model": args.model, "tokenizer": str(args.tokenizer), "vocab": tok.vocab_size,
        "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
        "dtype": str(dtype), "batch": args.batch, "max_tokens": args.max_tokens,
        "scheduler": "scheduler process" if args.scheduler_process else "in process", "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rounds": rounds,
        "unconstrained_tokens_per_s": best[False], "constrained_tokens_per_s": best[True],
        "ratio": best[True] / best[False], "target": 0.9,
    }
    write_json(args.out, result)
    print(table(result))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
