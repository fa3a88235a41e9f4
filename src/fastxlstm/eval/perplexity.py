"""Perplexity on the engine's fused forward (:meth:`fastxlstm.engine.Runner.token_logprobs`).

Two protocols over the same scored tokens (every token of every document plus its end-of-sequence
token, each predicted from what precedes it):

* ``window=None`` (default): each document is one sequence, scored from a fresh state with the state
  carried over the whole document (chunked: constant memory at any length). A recurrent model needs no
  sliding window: its state *is* the whole past.
* ``window=W``: the documents are concatenated and cut into non-overlapping windows of ``W`` inputs, each
  scored from a fresh state (the transformer convention, and that of ``fastxlstm.training.evaluate``; the
  last window may be shorter).

Each document is preceded by one context-only token: the BOS when the tokenizer inserts one
(``force_bos_token_insert``), else the end-of-sequence token that separates documents in training data.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..engine.runner import Runner
from ..training.data import META_NAME, TokenShards, iter_documents
from ..training.evaluate import token_stream


@dataclass
class Document:
    """Token ids of one document (ending with the end-of-sequence token when the tokenizer has one) and
    the UTF-8 size of its text (for bits per byte)."""

    ids: list[int]
    n_bytes: int


@dataclass
class PerplexityResult:
    tokens: int
    documents: int
    bytes: int
    nll: float            # mean negative log-likelihood per scored token (nats)
    perplexity: float
    bits_per_byte: float
    mode: str             # "document" (state carried through each document) or "window"
    window: int | None

    def to_dict(self) -> dict:
        return asdict(self)


def prefix_token(tokenizer) -> int:
    """The context-only token before each document (see the module docstring)."""
    tid = tokenizer.bos_token_id if tokenizer.add_bos else tokenizer.eos_token_id
    if tid is None:
        raise ValueError("perplexity needs the tokenizer's BOS (when it inserts one) or end-of-sequence token id")
    return int(tid)


def load_documents(data: str | os.PathLike | Sequence[str | os.PathLike], tokenizer, text_key: str = "text",
                   split: str = "val", max_documents: int | None = None) -> list[Document]:
    """Documents of text files, JSON-lines files (``text_key``), directories of those, or prepared
    token-shard directories (``meta.json``: the ``split`` stream cut after each end-of-sequence token; the
    byte count is that of the decoded text), in the order given."""
    paths = [Path(data)] if isinstance(data, (str, os.PathLike)) else [Path(p) for p in data]
    docs: list[Document] = []
    for path in paths:
        docs.extend(_shard_documents(path, tokenizer, split) if (path / META_NAME).is_file()
                    else _text_documents(path, tokenizer, text_key))
    docs = docs[:max_documents]
    if not docs:
        raise ValueError(f"{', '.join(map(str, paths))}: no documents with at least one token")
    return docs


def _text_documents(path: Path, tokenizer, text_key: str) -> Iterator[Document]:
    for text in iter_documents([path], text_key):
        yield Document(token_stream(tokenizer, [text]), len(text.encode("utf-8")))


def _shard_documents(path: Path, tokenizer, split: str) -> Iterator[Document]:
    shards = TokenShards(path)
    eos = shards.eos_token_id
    for shard in shards.split(split).shards:
        ids = torch.from_numpy(shard.astype("int64"))
        ends = (ids == eos).nonzero().view(-1).tolist() if eos is not None else []
        start = 0
        for end in [*ends, ids.numel() - 1]:
            piece = ids[start:end + 1].tolist()
            start = end + 1
            body = piece[:-1] if piece and piece[-1] == eos else piece
            if body:
                yield Document(piece, len(tokenizer.decode(body).encode("utf-8")))


def _sequences(docs: Sequence[Document], prefix: int, window: int | None) -> list[list[int]]:
    """The scored sequences: each is its inputs plus one more token (the last input's target)."""
    if window is None:
        return [[prefix, *d.ids] for d in docs]
    if window < 1:
        raise ValueError(f"window must be at least 1 token, got {window}")
    stream = [prefix] + [t for d in docs for t in d.ids]
    return [stream[i:i + window + 1] for i in range(0, len(stream) - 1, window)]


@torch.no_grad()
def score_sequences(runner: Runner, seqs: Sequence[Sequence[int]], batch_size: int = 8,
                    progress: bool = False) -> list[float]:
    """Sum of log-probabilities of ``seq[1:]`` given what precedes, for each sequence from a fresh state
    (chunked, state carried through the sequence). Sequences of similar length share a batch (right
    padding, which leaves each row's numbers as if alone). Returns one float per sequence, in order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if any(len(s) < 2 for s in seqs):
        raise ValueError("every scored sequence needs at least 2 tokens (a context token and a target)")
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]), reverse=True)
    dev = runner.device
    sums = [0.0] * len(seqs)
    bar = tqdm(total=sum(len(s) - 1 for s in seqs), unit="tok", desc="scoring", disable=not progress)
    for b0 in range(0, len(order), batch_size):
        idx = order[b0:b0 + batch_size]
        lengths = [len(seqs[i]) - 1 for i in idx]
        rows = torch.zeros(len(idx), lengths[0] + 1, dtype=torch.long)
        for j, i in enumerate(idx):
            rows[j, :len(seqs[i])] = torch.as_tensor(seqs[i])
        rows = rows.to(dev)
        scores = runner.token_logprobs(rows[:, :-1], rows[:, 1:], lengths=lengths)
        for i, total in zip(idx, scores.logprobs.double().sum(1).tolist()):
            sums[i] = total
        bar.update(sum(lengths))
    bar.close()
    return sums


def perplexity(runner: Runner, docs: Sequence[Document], prefix: int, window: int | None = None,
               batch_size: int = 8, progress: bool = False) -> PerplexityResult:
    """Score ``docs`` under one of the two protocols of the module docstring."""
    seqs = _sequences(docs, prefix, window)
    total = -math.fsum(score_sequences(runner, seqs, batch_size, progress))
    count = sum(len(s) - 1 for s in seqs)
    nll = total / count
    n_bytes = sum(d.n_bytes for d in docs)
    bpb = total / math.log(2) / n_bytes if n_bytes else float("nan")
    return PerplexityResult(count, len(docs), n_bytes, nll, math.exp(nll), bpb,
                            "document" if window is None else "window", window)
