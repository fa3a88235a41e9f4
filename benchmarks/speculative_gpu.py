"""Speculative decoding on the GPU: tokens/s against the acceptance rate, plain decode in the same run.

    python benchmarks/speculative_gpu.py --out-dir benchmarks/results/speculative      # H200, about 4 minutes
    python benchmarks/speculative_gpu.py --tiny --out-dir /tmp/spec                     # CPU dry run

The 7B shape (``xlstm-7b`` preset) with random weights, bf16, CUDA graphs, at batch 1 / 32 / 128 (``--batches``).
Per batch size the slots are prefilled once with random prompts and every run starts from those states:

* ``plain``: greedy decode steps (the engine's decode graphs); its tokens are the reference continuation.
* ``oracle-aN``: speculative steps with ``k`` drafts whose first ``N`` tokens are the reference continuation
  and the rest corrupted, so a step emits ``N + 1`` tokens while the output stays the plain one (checked:
  ``matches_plain``); ``N = k`` is the oracle drafter (100 % acceptance). For the oracle the LM head's rows are
  a permutation of the embedding rows ("peaked" random weights: the next token is a function of the current
  one with wide logit margins), so that the bf16 rounding differences between the chunkwise verification and
  the decode step do not flip argmax decisions; the compute is that of any 7B weights.
* ``ngram``: the n-gram drafter (prompt lookup, ``prompt_lookup_max`` 4) proposing from each sequence's prompt
  and output, on peaked weights whose permutation is made of 16-token cycles: the model's greedy output then
  repeats with a period of about 16 tokens, which the drafter has to find in what it has read (random weights
  give no text that repeats by itself: paper-init random weights never produced a draft in 128 tokens). A
  step where no row has a draft runs a plain decode step, as ``LLM`` does.

Each speculative step reads the emitted tokens back (one host sync a step, as ``LLM`` does with the n-gram
drafter). JSON rows (``speculative.json`` in ``--out-dir``): batch, run, seconds, tokens, steps, tok/s,
tokens per step, accepted/drafted, speedup over plain decode at the same batch.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fastxlstm.bench.common import device_name, free_memory, random_xlstm, seeded_tokens, sync, write_json
from fastxlstm.config import XLSTMConfig, preset
from fastxlstm.engine import Engine
from fastxlstm.engine.speculative import NgramIndex
from fastxlstm.sampling import SamplingParams

TINY = XLSTMConfig(vocab_size=512, embedding_dim=64, num_blocks=2, num_heads=2, weight_mode="fused")


class Slots:
    """``batch`` prefilled slots of one engine, reset to their post-prefill state (and pending token) per run."""

    def __init__(self, engine: Engine, prompts: torch.Tensor):
        self.engine, self.prompts = engine, prompts.tolist()
        self.slots = [engine.allocate_slot() for _ in self.prompts]
        logits = engine.prefill_into_slots(self.slots, self.prompts)
        self.first = engine.sample(self.slots, logits).tolist()
        self.saved = [engine.get_slot_state(s) for s in self.slots]

    def reset(self, n_tokens: int) -> None:
        eng = self.engine
        for s, st, prompt, tok in zip(self.slots, self.saved, self.prompts, self.first):
            eng.set_slot_state(s, st)
            eng.configure_slot(s, SamplingParams(max_new_tokens=n_tokens, ignore_eos=True), prompt)
            eng.start_from_token(s, tok)


def plain(slots: Slots, n: int) -> tuple[float, list[list[int]]]:
    eng = slots.engine
    slots.reset(n)
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        eng.decode_step(return_outputs=False)
    reads = eng.read_tokens(slots.slots)
    return time.perf_counter() - t0, [rd.new_tokens for rd in reads]


def speculative(slots: Slots, n: int, propose, fallback: bool = False) -> tuple[float, list[list[int]], int]:
    """Speculative steps until every slot emitted ``n`` tokens; ``propose(slot_index, emitted_so_far)``.
    ``fallback``: a step where no slot has a draft is a plain decode step (``LLM``'s n-gram policy)."""
    eng = slots.engine
    slots.reset(n)
    out = [[] for _ in slots.slots]
    steps = 0
    sync()
    t0 = time.perf_counter()
    while any(len(o) < n for o in out):
        drafts = {s: propose(j, out[j]) for j, s in enumerate(slots.slots) if len(out[j]) < n}
        if fallback and not any(drafts.values()):
            eng.decode_step(return_outputs=False)
        else:
            eng.spec_step(drafts)
        steps += 1
        for j, rd in enumerate(eng.read_tokens(slots.slots)):
            out[j].extend(rd.new_tokens)
    return time.perf_counter() - t0, out, steps


def spec_totals(eng: Engine, slots: Slots) -> tuple[int, int]:
    drafted = accepted = 0
    for s in slots.slots:
        _, d, a = eng.spec_counts(s)
        drafted, accepted = drafted + d, accepted + a
    return drafted, accepted


def row(batch: int, run: str, seconds: float, out: list[list[int]], steps: int, drafted: int, accepted: int,
        ref: list[list[int]] | None, plain_tok_s: float | None) -> dict:
    tokens = sum(len(o) for o in out)
    tok_s = tokens / seconds
    r = {"batch": batch, "run": run, "seconds": round(seconds, 4), "tokens": tokens, "steps": steps,
         "tok_s": round(tok_s, 1), "tokens_per_step_per_seq": round(tokens / max(steps, 1) / batch, 3),
         "drafted": drafted, "accepted": accepted, "acceptance": round(accepted / drafted, 4) if drafted else None,
         "speedup_vs_plain": round(tok_s / plain_tok_s, 3) if plain_tok_s else None}
    if ref is not None:
        r["matches_plain"] = sum(o == x for o, x in zip(out, ref)) / len(out)
    print(r, flush=True)
    return r


def peak_head(model, cycle: int = 0) -> None:
    """LM head rows = a fixed permutation of the embedding rows: wide-margin greedy decisions. ``cycle``: the
    permutation is made of cycles of that many tokens (a random order cut into pieces), so the greedy
    output, which mostly follows the permutation, repeats with about that period."""
    emb = model.backbone.embeddings.weight
    perm = torch.randperm(emb.shape[0], generator=torch.Generator().manual_seed(0))
    if cycle:
        order, perm = perm, torch.empty_like(perm)
        for i in range(0, len(order), cycle):
            piece = order[i:i + cycle]
            perm[piece] = piece.roll(1)
    perm = perm.to(emb.device)
    with torch.no_grad():
        model.lm_head.weight.copy_(emb[perm])


def bench_batch(model, batch: int, k: int, n: int, levels: list[int], prompt_len: int, rows: list) -> None:
    vocab = model.config.vocab_size
    spec = {"method": "ngram", "num_speculative_tokens": k}
    eng = Engine(model, max_slots=batch, speculative=spec)
    slots = Slots(eng, seeded_tokens(prompt_len, vocab, batch, seed=batch))
    plain(slots, 2)  # capture the decode graph
    speculative(slots, 2, lambda j, o: [])  # and the speculative one
    sec, ref = plain(slots, n)
    base = batch * n / sec
    rows.append(row(batch, "plain", sec, ref, n, 0, 0, None, base))
    for a in levels:
        def propose(j, emitted, a=a):
            truth = ref[j][len(emitted):len(emitted) + k]
            return truth[:a] + [(t + 1) % vocab for t in truth[a:]]

        sec, out, steps = speculative(slots, n, propose)
        rows.append(row(batch, f"oracle-a{a}", sec, out, steps, *spec_totals(eng, slots), ref, base))


def bench_ngram(model, batch: int, k: int, n: int, rows: list) -> None:
    vocab = model.config.vocab_size
    seg = seeded_tokens(16, vocab, batch, seed=7 + batch)
    prompts = seg.repeat(1, 4)
    eng = Engine(model, max_slots=batch, speculative={"method": "ngram", "num_speculative_tokens": k,
                                                       "prompt_lookup_max": 4})
    slots = Slots(eng, prompts)
    plain(slots, 2)
    sec, ref = plain(slots, n)
    base = batch * n / sec
    rows.append(row(batch, "plain-ngram-workload", sec, ref, n, 0, 0, None, base))
    indexes = []
    for j in range(batch):
        idx = NgramIndex(1, 4)
        idx.extend(slots.prompts[j] + [slots.first[j]])
        indexes.append(idx)
    seen = [0] * batch

    def propose(j, emitted):
        indexes[j].extend(emitted[seen[j]:])
        seen[j] = len(emitted)
        return indexes[j].propose(k)

    speculative(slots, 2, propose, fallback=True)  # warm (its own indexes are rebuilt below)
    for j in range(batch):
        indexes[j] = NgramIndex(1, 4)
        indexes[j].extend(slots.prompts[j] + [slots.first[j]])
        seen[j] = 0
    sec, out, steps = speculative(slots, n, propose, fallback=True)
    rows.append(row(batch, "ngram", sec, out, steps, *spec_totals(eng, slots), ref, base))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--tiny", action="store_true", help="CPU dry run on a tiny config")
    ap.add_argument("--batches", default="1,32,128")
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--tokens", type=int, default=0, help="tokens per sequence per run (default 128, batch 128: 64)")
    args = ap.parse_args()
    t0 = time.time()
    on_gpu = torch.cuda.is_available() and not args.tiny
    dev, dt = ("cuda", torch.bfloat16) if on_gpu else ("cpu", torch.float32)
    cfg = TINY if args.tiny else preset("xlstm-7b", weight_mode="fused")
    batches = [int(b) for b in args.batches.split(",")]
    if args.tiny:
        batches = sorted({min(b, 4) for b in batches})
    levels = sorted({0, 2, args.k})
    out = {"device": device_name() if on_gpu else "cpu", "torch": torch.__version__, "config": "tiny" if args.tiny
           else "xlstm-7b", "dtype": str(dt), "k": args.k,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": []}
    path = Path(args.out_dir) / "speculative.json"
    model = random_xlstm(cfg, dev, dt)
    peak_head(model)
    for b in batches:
        n = args.tokens or (16 if args.tiny else (64 if b >= 128 else 128))
        bench_batch(model, b, args.k, n, levels, 8 if args.tiny else 32, out["rows"])
        write_json(path, out)
        free_memory()  # the engine of this batch size (its states and graph pool)
    peak_head(model, cycle=16)  # the n-gram workload: output that repeats
    for b in batches:
        n = args.tokens or (16 if args.tiny else (64 if b >= 128 else 128))
        bench_ngram(model, b, args.k, n, out["rows"])
        write_json(path, out)
        free_memory()
    out["wall_s"] = round(time.time() - t0, 1)
    write_json(path, out)
    print(f"wrote {path} in {out['wall_s']} s")


if __name__ == "__main__":
    main()
