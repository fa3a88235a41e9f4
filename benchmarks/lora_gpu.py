"""LoRA vs full fine-tuning on one GPU, random weights: ``python benchmarks/lora_gpu.py OUT_JSON [--tiny]``.

The trainer's two recipes (``fastxlstm.training.trainer.build``), timed in one process on random tokens:

* ``lora``: the base in bf16, frozen, 'single' layout; float32 LoRA weights (``fastxlstm.model.lora.apply_lora``,
  r=16 on the default targets); AdamW over the adapters only.
* ``full``: float32 weights with bf16 autocast (the trainer's full fine-tune); AdamW over every parameter.

Both: bf16 autocast, activation checkpointing, ``--seq-len`` x ``--batch`` tokens per step, ``--steps`` timed
optimizer steps after 2 warm-up steps. Reported: tokens/s and peak GPU memory per recipe (an OOM is recorded as
such: full fine-tuning of the 7B in float32 with AdamW needs about 16 bytes per parameter, 110+ GiB before
activations). ``--presets`` (default xlstm-7b,xlstm-1.3b). ``--tiny``: a 2-block model on the CPU in float32 with a
short sequence (a dry run of both paths; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from fastxlstm.bench.common import (
    device,
    device_name,
    free_memory,
    is_oom,
    peak_gb,
    random_xlstm,
    reset_peak,
    timed,
    write_json,
)
from fastxlstm.config import XLSTMConfig, preset
from fastxlstm.model.lora import LoRAConfig, apply_lora
from fastxlstm.training.optim import build_optimizer


def _model(cfg: XLSTMConfig, recipe: str, rank: int):
    on_gpu = device() == "cuda"
    if recipe == "lora":
        model = random_xlstm(cfg, device(), torch.bfloat16 if on_gpu else torch.float32)
        apply_lora(model, LoRAConfig(r=rank, alpha=2 * rank))
    else:
        model = random_xlstm(cfg, device(), torch.float32)
    model.train()
    model.gradient_checkpointing = True
    return model


def run(cfg: XLSTMConfig, recipe: str, args) -> dict:
    reset_peak()
    row: dict = {"recipe": recipe}
    try:
        model = _model(cfg, recipe, args.rank)
        row["parameters"] = sum(p.numel() for p in model.parameters())
        row["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        opt = build_optimizer(model, 1e-4, 0.0, (0.9, 0.95), 1e-8, fused=device() == "cuda")
        gen = torch.Generator(device=device()).manual_seed(0)
        ids = torch.randint(3, cfg.vocab_size, (args.batch, args.seq_len + 1), device=device(), generator=gen)
        autocast = torch.autocast(device(), dtype=torch.bfloat16, enabled=device() == "cuda")

        def step(model=model, opt=opt):
            with autocast:
                logits, _ = model(ids[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        for _ in range(2):
            step()
        seconds, _ = timed(lambda s=step: [s() for _ in range(args.steps)])
        row |= {"tokens_per_s": args.batch * args.seq_len * args.steps / seconds, "step_s": seconds / args.steps,
                "peak_memory_gib": peak_gb()}
        del step, model, opt
    except Exception as e:  # noqa: BLE001 - an OOM of one recipe must not end the run
        if not is_oom(e):
            raise
        row |= {"oom": True, "peak_memory_gib": peak_gb(), "error": str(e).splitlines()[0][:200]}
    free_memory()
    print(row, flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--tiny", action="store_true", help="CPU dry run (2 blocks, 64 tokens)")
    p.add_argument("--presets", default="xlstm-7b,xlstm-1.3b")
    p.add_argument("--recipes", default="lora,full")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    args = p.parse_args(argv)
    if not args.tiny and device() != "cuda":
        sys.exit("no CUDA device: run with --tiny for the CPU dry run")
    if args.tiny:
        configs = {"tiny": XLSTMConfig(vocab_size=320, embedding_dim=64, num_blocks=2, num_heads=2, chunk_size=16)}
        args.seq_len, args.steps = 64, 2
    else:
        configs = {name: preset(name) for name in args.presets.split(",")}
    out: dict = {"device": device_name(), "torch": torch.__version__, "weights": "random", "seq_len": args.seq_len,
                 "batch": args.batch, "steps": args.steps, "lora_rank": args.rank,
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "runs": {}}
    t0 = time.time()
    for name, cfg in configs.items():
        out["runs"][name] = [run(cfg.replace(weight_mode="single"), r, args) for r in args.recipes.split(",")]
        write_json(args.out, out)
    out["total_s"] = time.time() - t0
    write_json(args.out, out)
    print(f"wrote {args.out} ({out['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
