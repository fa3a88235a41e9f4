"""Evaluation on the GPU, 7B shape, random weights: ``python benchmarks/eval_gpu.py OUT_JSON [--tiny]``.

1. lm-eval ``loglikelihood`` throughput (requests/s) of the ``fastxlstm`` backend against lm-eval's own ``hf``
   backend running transformers' ``xLSTMForCausalLM`` that holds the same weights: multiple-choice-shaped
   requests (``--contexts`` contexts of about ``--context-tokens`` tokens, 4 continuations of 8-24 tokens each,
   as in HellaSwag), the same request list for both; also the largest difference of their log-likelihoods.
2. ``fastxlstm eval niah`` (the harness, on the engine) at ``--lengths`` (default 4k ... 128k) in one run: peak
   GPU memory and seconds per length. With random weights the accuracy is noise; the point is that the memory
   stays flat from 4k to 128k (chunked prefill of a recurrent state) and the time grows linearly.

``--tiny``: a 2-block model on the CPU in float32, 512/1024-token NIAH prompts and a few requests (a dry run of
every code path; its numbers mean nothing). The byte-level tokenizer (``Tokenizer.byte_level``) serves both
backends, so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import random
import sys
import time

import torch

from fastxlstm.bench.common import device, device_name, dtype, free_memory, random_xlstm, timed, write_json
from fastxlstm.config import XLSTMConfig, preset
from fastxlstm.engine import LLM
from fastxlstm.eval import niah
from fastxlstm.model.hf_layout import single_mode_state
from fastxlstm.tokenizer import Tokenizer

WORDS = ("the river runs past a quiet town where old bridges cross the water and people walk at dusk while "
         "lanterns glow over the market square full of bread fruit and songs").split()


def _text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def _requests(contexts: int, context_tokens: int, seed: int = 0):
    from lm_eval.api.instance import Instance

    rng = random.Random(seed)
    args = []
    for _ in range(contexts):
        ctx = _text(rng, max(1, context_tokens // 5))  # byte-level: ~5 tokens per word
        args.extend((ctx, " " + _text(rng, rng.randint(2, 5))) for _ in range(4))
    return [Instance(request_type="loglikelihood", doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def _hf_twin(model, cfg: XLSTMConfig):
    """transformers' xLSTMForCausalLM on the same device and dtype, holding ``model``'s weights."""
    from transformers import xLSTMConfig, xLSTMForCausalLM

    data = {k: v for k, v in cfg.to_dict().items() if k not in ("architectures", "model_type", "transformers_version")}
    data["weight_mode"] = "single"
    hf_cfg = xLSTMConfig(**data)
    with torch.device("meta"):
        hf = xLSTMForCausalLM(hf_cfg)
    hf.load_state_dict(single_mode_state(model), strict=True, assign=True)
    return hf.eval()


def loglikelihood(cfg: XLSTMConfig, tok: Tokenizer, args) -> dict:
    from lm_eval.models.huggingface import HFLM
    from transformers import PreTrainedTokenizerFast

    from fastxlstm.eval.lm_eval_backend import FastXLSTMLM

    model = random_xlstm(cfg, device(), dtype())
    reqs = _requests(args.contexts, args.context_tokens)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok.tok, bos_token="<|endoftext|>", eos_token="<|eos|>",
                                     pad_token="<|padding|>")
    hf = HFLM(pretrained=_hf_twin(model, cfg), tokenizer=hf_tok, batch_size=args.batch_size, device=device())
    out = {"requests": len(reqs), "batch_size": args.batch_size}
    hf.loglikelihood(reqs[:args.batch_size], disable_tqdm=True)  # warm-up
    hf_s, hf_ll = timed(lambda h=hf: h.loglikelihood(reqs, disable_tqdm=True))
    del hf
    free_memory()
    ours = FastXLSTMLM(LLM(model, tok), batch_size=args.batch_size)
    ours.loglikelihood(reqs[:args.batch_size], disable_tqdm=True)  # warm-up (kernel compilation)
    our_s, our_ll = timed(lambda o=ours: o.loglikelihood(reqs, disable_tqdm=True))
    out |= {"fastxlstm_requests_s": len(reqs) / our_s, "hf_requests_s": len(reqs) / hf_s,
            "speedup": hf_s / our_s,
            "max_abs_loglik_diff": max(abs(a[0] - b[0]) for a, b in zip(our_ll, hf_ll)),
            "mean_abs_loglik": sum(abs(a[0]) for a in hf_ll) / len(hf_ll),
            "greedy_agreement": sum(a[1] == b[1] for a, b in zip(our_ll, hf_ll)) / len(hf_ll)}
    print(f"loglikelihood: fastxlstm {out['fastxlstm_requests_s']:.1f} req/s, hf {out['hf_requests_s']:.1f} req/s "
          f"({out['speedup']:.1f}x), max |d loglik| {out['max_abs_loglik_diff']:.3g}", flush=True)
    del ours, model
    free_memory()
    return out


def needle(cfg: XLSTMConfig, tok: Tokenizer, args) -> dict:
    model = random_xlstm(cfg, device(), dtype())
    llm = LLM(model, tok, max_slots=1, prefill_chunk_size=args.chunk_size)
    lengths = niah.parse_lengths(args.lengths)
    prompts = niah.NiahBuilder(tok).samples(["single"], lengths, [0.5], 1)
    niah.run(niah.engine_generate(llm), prompts[:1], max_new_tokens=4)  # warm-up (kernel compilation)
    res = niah.run(niah.engine_generate(llm), prompts, max_new_tokens=args.max_new_tokens, batch_size=1,
                   device=model.device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    out = {"lengths": lengths, "seconds": res["seconds"], "peak_memory_gib": res["peak_memory_gib"],
           "weights_gib": weights, "chunk_size": args.chunk_size, "max_new_tokens": args.max_new_tokens,
           "accuracy_noise": res["by_length"]}
    for n in lengths:
        mem = res["peak_memory_gib"].get(str(n), float("nan"))
        print(f"niah {n:>7,} tokens: {res['seconds'][str(n)]:.2f} s, peak {mem:.2f} GiB", flush=True)
    del llm, model
    free_memory()
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--tiny", action="store_true", help="CPU dry run (2 blocks, short prompts)")
    p.add_argument("--preset", default="xlstm-7b")
    p.add_argument("--lengths", default=None, help="NIAH lengths (default 4k,8k,16k,32k,64k,128k; tiny 512,1024)")
    p.add_argument("--contexts", type=int, default=None, help="loglikelihood contexts, 4 requests each")
    p.add_argument("--context-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--chunk-size", type=int, default=4096)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--skip", default="", help="comma-separated parts to skip: loglikelihood,niah")
    args = p.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --tiny for the CPU dry run")
    if args.tiny:
        cfg = XLSTMConfig(vocab_size=320, embedding_dim=256, num_blocks=2, num_heads=2, chunk_size=16)
        args.lengths = args.lengths or "512,1024"
        args.contexts = args.contexts or 4
        args.batch_size, args.chunk_size, args.context_tokens = 4, 128, 48
    else:
        cfg = preset(args.preset)
        args.lengths = args.lengths or "4k,8k,16k,32k,64k,128k"
        args.contexts = args.contexts or 32
    tok = Tokenizer.byte_level()
    out: dict = {"device": device_name(), "torch": torch.__version__, "dtype": str(dtype()).removeprefix("torch."),
                 "preset": "tiny" if args.tiny else args.preset, "weights": "random",
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    t0 = time.time()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if "loglikelihood" not in skip:
        out["loglikelihood"] = loglikelihood(cfg, tok, args)
        write_json(args.out, out)
    if "niah" not in skip:
        out["niah"] = needle(cfg, tok, args)
    out["total_s"] = time.time() - t0
    write_json(args.out, out)
    print(f"wrote {args.out} ({out['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
