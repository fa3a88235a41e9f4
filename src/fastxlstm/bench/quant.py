"""``fastxlstm bench --quantization``: the quantized variants' set-up and their distance from bf16.

:func:`quantize_against_bf16` quantizes the bf16 benchmark model in place on the GPU and records how
far its logits move (KL divergence from the bf16 model's next-token distribution, top-1 agreement) on
random inputs: the prefill path (4 x 256 tokens through the model's forward: W8A8 for fp8, the
dequantized weight for int8) and the batch-1 decode path (16 greedy steps of the engine's runner: the
weight-only GEMVs), both fed the bf16 model's tokens. On a random-weight model this is a proxy for a
trained model's perplexity change, as the issue asks.
"""

from __future__ import annotations

import time

import torch

from .common import Plan, Recorder, seeded_tokens, sync


def _kl_top1(ref: torch.Tensor, got: torch.Tensor) -> tuple[float, float]:
    """Mean KL(ref || got) in nats over the rows of ``[N, V]`` logits, and the top-1 agreement."""
    lp, lq = ref.float().log_softmax(-1), got.float().log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    return kl.mean().item(), (ref.argmax(-1) == got.argmax(-1)).float().mean().item()


@torch.no_grad()
def _decode_logits(model, prompt: torch.Tensor, tokens: list[int] | None, steps: int) -> tuple[torch.Tensor, list]:
    """Logits of ``steps`` batch-1 decode steps of the engine's runner after prefilling ``prompt``; fed
    ``tokens`` (None: its own greedy tokens, returned)."""
    from ..engine.runner import Runner

    runner = Runner(model)
    hidden, state = runner.forward_tokens(prompt)
    out, fed = [runner.logits(hidden)[0]], []
    for i in range(steps):
        tok = int(out[-1].argmax()) if tokens is None else tokens[i]
        fed.append(tok)
        out.append(runner.decode(torch.tensor([tok], device=prompt.device), state)[0])
    return torch.stack(out), fed


def quantize_against_bf16(model, scheme: str, plan: Plan, rec: Recorder):
    from ..model.quant import quantize_model

    vocab = model.config.vocab_size
    ids = seeded_tokens(256, vocab, batch=4, device=str(model.device), seed=7)
    prompt = ids[:1, :64]
    with torch.no_grad():
        ref = model(ids)[0].flatten(0, 1)
    ref_dec, fed = _decode_logits(model, prompt, None, 16)
    sync()
    t0 = time.perf_counter()
    quantize_model(model, scheme)
    sync()
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        got = model(ids)[0].flatten(0, 1)
    got_dec, _ = _decode_logits(model, prompt, fed, 16)
    kl, top1 = _kl_top1(ref, got)
    kl_dec, top1_dec = _kl_top1(ref_dec, got_dec)
    rec.set("quantization", {"scheme": scheme, "quantize_s": seconds, "lm_head": False,
                             "kl_vs_bf16_prefill": kl, "top1_agree_prefill": top1,
                             "kl_vs_bf16_decode_b1": kl_dec, "top1_agree_decode_b1": top1_dec,
                             "inputs": "random tokens: 4 x 256 through the forward; 64-token prompt + 16 decode steps"})
    ref = got = None
    torch.cuda.empty_cache()
    return model
