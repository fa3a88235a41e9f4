"""Structured-output throughput vs unconstrained, in one run: the server (in process, the real engine) under
``--batch`` concurrent chat requests of ``--max-tokens`` sampled tokens each, first without a constraint
(``ignore_eos``, so every answer runs to the limit), then with a JSON schema whose shortest valid answer is
longer than the limit (EOS stays disallowed, so every answer runs to the limit too: the same token count). The
ratio constrained / unconstrained of completion tokens per second is the cost of the grammar (bitmask filling
on the host, one decode step per host read, the mask in the sampler). Target: >= 0.9 at batch 32.

    PYTHONPATH=src python benchmarks/structured_gpu.py --out-dir benchmarks/results            # GPU, xLSTM 7B
    PYTHONPATH=src python benchmarks/structured_gpu.py --tiny --out-dir /tmp/structured        # CPU dry run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time
from pathlib import Path

import torch

SCHEMA = {  # at least 200 records: no valid answer fits the token budget, so EOS is never allowed
    "type": "array", "minItems": 200,
    "items": {"type": "object", "additionalProperties": False, "required": ["name", "line", "act"],
              "properties": {"name": {"type": "string", "maxLength": 16}, "line": {"type": "string", "maxLength": 48},
                             "act": {"type": "integer", "minimum": 1, "maximum": 5}}},
}


async def _one(client, model: str, i: int, max_tokens: int, constrained: bool) -> tuple[float, float, int]:
    """(seconds to the first token, total seconds, completion tokens) of one streamed request."""
    extra = {"response_format": {"type": "json_schema", "json_schema": {"name": "cast", "schema": SCHEMA}}} \
        if constrained else {"extra_body": {"ignore_eos": True}}
    t0 = time.perf_counter()
    first, tokens = None, 0
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": f"List the cast of scene {i}."}], max_tokens=max_tokens,
        temperature=1.0, seed=i, stream=True, stream_options={"include_usage": True}, **extra)
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - t0
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return first or 0.0, time.perf_counter() - t0, tokens


async def _round(base_url: str, model: str, batch: int, max_tokens: int, constrained: bool) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0, timeout=3600)
    t0 = time.perf_counter()
    out = await asyncio.gather(*(_one(client, model, i, max_tokens, constrained) for i in range(batch)))
    wall = time.perf_counter() - t0
    tokens = sum(t for _, _, t in out)
    await client.close()
    return {"constrained": constrained, "requests": batch, "completion_tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "ttft_p50_s": statistics.median(f for f, _, _ in out),
            "all_at_limit": all(t == max_tokens for _, _, t in out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="NX-AI/xLSTM-7b")
    ap.add_argument("--tiny", action="store_true", help="CPU dry run: the embedded Shakespeare model, small counts")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2, help="timed rounds per variant (after one warm-up round)")
    ap.add_argument("--out-dir", type=Path, required=True)
    args = ap.parse_args()
    if args.tiny:
        args.model = str(Path(__file__).resolve().parents[1] / "models" / "xlstm-shakespeare-10m")
        args.batch, args.max_tokens, args.repeats = min(args.batch, 4), min(args.max_tokens, 24), 1

    from fastxlstm.checkpoint import load_model_and_tokenizer
    from fastxlstm.serving.app import build_app
    from fastxlstm.serving.runtime import ServeConfig
    from fastxlstm.serving.testing import ServerThread

    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model, tok = load_model_and_tokenizer(args.model, device=device, dtype=dtype, weight_mode="fused")
    config = ServeConfig(model_name="bench", max_slots=max(args.batch, 1), max_waiting=4 * args.batch,
                         prefix_cache_bytes=0, request_timeout=None)
    rounds = []
    with ServerThread(build_app(model, tok, config)) as srv:
        for constrained in (False, True):  # one warm-up round each (graph captures, grammar compile)
            asyncio.run(_round(srv.base_url, "bench", args.batch, args.max_tokens, constrained))
        for _ in range(args.repeats):  # interleaved, so drift hits both alike
            for constrained in (False, True):
                rounds.append(asyncio.run(_round(srv.base_url, "bench", args.batch, args.max_tokens, constrained)))
    best = {c: max(r["tokens_per_s"] for r in rounds if r["constrained"] == c) for c in (False, True)}
    result = {
        "benchmark": "structured_gpu", "model": args.model, "device": torch.cuda.get_device_name(0)
        if device == "cuda" else platform.processor() or "cpu", "dtype": str(dtype), "batch": args.batch,
        "max_tokens": args.max_tokens, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                         time.gmtime()),
        "rounds": rounds, "unconstrained_tokens_per_s": best[False], "constrained_tokens_per_s": best[True],
        "ratio": best[True] / best[False], "target": 0.9,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / ("structured_cpu_tiny.json" if args.tiny else "structured_gpu.json")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)
    print(json.dumps({k: result[k] for k in ("device", "batch", "unconstrained_tokens_per_s",
                                             "constrained_tokens_per_s", "ratio")}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
