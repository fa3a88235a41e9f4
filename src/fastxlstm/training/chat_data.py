"""Chat and instruction data for supervised fine-tuning: token shards plus a loss mask per token.

``fastxlstm data prepare --format chat|instruct`` reads JSON-lines records, renders each through
the model's chat template (:class:`fastxlstm.serving.chat_template.ChatTemplate`: the tokenizer directory's
``chat_template``, else the server's documented default), tokenises it and marks the tokens to
train: those of assistant turns (``chat``) or of the completion (``instruct``), plus the final
``eos`` when the record ends with an assistant turn. Everything else (system and user turns, the
template's role headers) is context only.

Records::

    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}   # --format chat
    {"prompt": "...", "completion": "...", "system": "..." (optional)}             # --format instruct

An instruct record is the chat ``[system], user: prompt, assistant: completion``.

On disk, next to the layout of :mod:`fastxlstm.training.data` (``meta.json`` gets ``"format"``):

    train-00000.bin            token ids, whole documents (a document never straddles two shards)
    train-00000.mask.bin       uint8 per token: 1 = train on predicting this token
    train.docs.bin             int64 [documents, 3]: shard index, offset, length
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from .data import (
    JSONL_SUFFIXES,
    TokenShards,
    _expand_inputs,
    _fresh_out_dir,
    _open_tokenizer,
    _ShardWriter,
    _special_ids,
    _write_meta,
    is_heldout,
    iter_jsonl,
    token_dtype,
)

FORMATS = ("chat", "instruct")
ROLES = ("system", "developer", "user", "assistant")
MASK_SUFFIX = ".mask.bin"
DOCS_SUFFIX = ".docs.bin"


# ----------------------------------------------------------------------------- records
def _messages(record, fmt: str, where: str) -> list[dict[str, str]]:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object")
    if fmt == "chat":
        msgs = record.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise ValueError(f"{where}: expected a non-empty list field 'messages'")
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ValueError(f"{where}: messages[{j}] must be {{'role': one of {', '.join(ROLES)}, "
                                 f"'content': a string}}")
        if not any(m["role"] == "assistant" for m in msgs):
            raise ValueError(f"{where}: no assistant message (nothing to train on)")
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    for key in ("prompt", "completion"):
        if not isinstance(record.get(key), str):
            raise ValueError(f"{where}: expected string fields 'prompt' and 'completion'")
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise ValueError(f"{where}: 'system' must be a string")
    return ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]


def iter_conversations(inputs: Iterable[str | os.PathLike], fmt: str) -> Iterator[list[dict[str, str]]]:
    """Message lists from JSON-lines files (``fmt`` chat or instruct); errors name file and line."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    for path in _expand_inputs(inputs):
        if path.suffix.lower() not in JSONL_SUFFIXES:
            raise ValueError(f"{path}: --format {fmt} reads JSON-lines files ({'/'.join(JSONL_SUFFIXES)})")
        for lineno, record in iter_jsonl(path):
            yield _messages(record, fmt, f"{path}:{lineno}")


def render_with_spans(template, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The conversation's text and the character spans of its assistant turns.

    Each assistant turn's span is what rendering it adds after the template's generation prompt
    (``render(messages[:i], add_generation_prompt=True)``), so the role header is context and the
    turn's content and end-of-turn text are trained. Templates whose renderings are not prefixes of
    one another are rejected (the mask could not be placed).
    """
    text = template.render(messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = template.render(messages[:i], add_generation_prompt=True)
        upto = template.render(messages[: i + 1], add_generation_prompt=False)
        if not (upto.startswith(prompt) and text.startswith(upto)):
            raise ValueError(f"chat template ({template.origin}): the rendering of the first {i} messages plus the "
                             "generation prompt is not a prefix of the whole conversation; cannot mask the turns")
        spans.append((len(prompt), len(upto)))
    return text, spans


def encode_conversation(tok, template, messages: list[dict[str, str]], eos: int | None
                        ) -> tuple[np.ndarray, np.ndarray, str]:
    """Token ids, the 0/1 loss mask (a token is trained when it starts inside an assistant span) and
    the rendered text. The whole conversation is tokenised at once, as at inference."""
    text, spans = render_with_spans(template, messages)
    enc = tok.encode(text, add_special_tokens=False)
    starts = [s for s, _ in spans]
    mask = np.zeros(len(enc.ids) + (eos is not None), dtype=np.uint8)
    for j, (a, _) in enumerate(enc.offsets):
        k = bisect.bisect_right(starts, a) - 1
        mask[j] = k >= 0 and a < spans[k][1]
    ids = list(enc.ids)
    if eos is not None:
        ids.append(eos)
        mask[-1] = messages[-1]["role"] == "assistant"
    return np.asarray(ids, dtype=np.int64), mask, text


# ------------------------------------------------------------------------------ write
def prepare_chat(
    tokenizer_path: str | os.PathLike, inputs: Iterable[str | os.PathLike], out_dir: str | os.PathLike,
    fmt: str = "chat", val_fraction: float = 0.01, shard_tokens: int = 100_000_000,
    val_inputs: Iterable[str | os.PathLike] | None = None, template_dir: str | os.PathLike | None = None,
) -> dict:
    """Tokenise chat/instruct JSONL into masked shards under ``out_dir``; returns ``meta.json``.

    The template comes from ``template_dir`` (default: the tokenizer's directory). Documents go to
    the held-out split by a hash of their rendered text (:func:`fastxlstm.training.data.is_heldout`)
    or, with ``val_inputs``, are exactly those records.
    """
    from ..serving.chat_template import ChatTemplate

    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    tok, tok_dir, tok_file = _open_tokenizer(tokenizer_path)
    template = ChatTemplate.from_model_dir(template_dir or tok_dir)
    special = _special_ids(tok_dir, tok)
    vocab_size = tok.get_vocab_size()
    dtype = token_dtype(vocab_size)
    out = _fresh_out_dir(out_dir)
    writers = {s: _ShardWriter(out, s, dtype, shard_tokens) for s in ("train", "val")}
    masks = {s: _ShardWriter(out, s, np.dtype(np.uint8), shard_tokens, suffix=MASK_SUFFIX) for s in writers}
    docs: dict[str, list[tuple[int, int, int]]] = {s: [] for s in writers}
    trained = {s: 0 for s in writers}
    stream = [("train", m) for m in iter_conversations(inputs, fmt)]
    if val_inputs:
        stream += [("val", m) for m in iter_conversations(val_inputs, fmt)]
    try:
        for fixed, messages in stream:
            ids, mask, text = encode_conversation(tok, template, messages, special["eos_token_id"])
            split = fixed if val_inputs else ("val" if is_heldout(text, val_fraction) else "train")
            w = writers[split]
            w.start_document(ids.size)
            masks[split].start_document(ids.size)
            docs[split].append((len(w.shards) - 1, w.shards[-1]["tokens"], ids.size))
            w.write(ids)
            masks[split].write(mask)
            trained[split] += int(mask.sum())
    finally:
        for w in (*writers.values(), *masks.values()):
            w.close()
    if not docs["train"]:
        raise ValueError("no training documents were produced (empty inputs, or every document held out)")
    for split, rows in docs.items():
        np.asarray(rows, dtype=np.int64).reshape(-1, 3).tofile(out / f"{split}{DOCS_SUFFIX}")
    for fname in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        src = tok_file if fname == "tokenizer.json" else tok_dir / fname
        if src.exists() and src.resolve() != (out / fname).resolve():
            (out / fname).write_bytes(src.read_bytes())
    return _write_meta(
        out, dtype, vocab_size, special, writers, {s: len(d) for s, d in docs.items()},
        split_mode="explicit" if val_inputs else "documents", val_fraction=val_fraction, format=fmt,
        chat_template=template.origin, trained_tokens=trained,
        sources=[str(f) for f in _expand_inputs(inputs)],
    )


# ------------------------------------------------------------------------------- read
@dataclass
class Documents:
    """One split of a chat/instruct directory: documents as (tokens, mask) views into the shards."""

    tokens: list[np.memmap]
    masks: list[np.memmap]
    index: np.ndarray  # int64 [n, 3]: shard, offset, length

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def document(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        s, o, n = (int(v) for v in self.index[i])
        return (np.asarray(self.tokens[s][o : o + n], dtype=np.int64),
                np.asarray(self.masks[s][o : o + n], dtype=np.bool_))


def is_chat_data(data: TokenShards) -> bool:
    return data.meta.get("format") in FORMATS


def load_documents(data: TokenShards, split: str) -> Documents:
    """The documents of ``split`` with their masks; errors name the missing or truncated file."""
    if not is_chat_data(data):
        raise ValueError(f"{data.dir} holds plain token shards, not chat/instruct data (`data prepare --format`)")
    token_split = data.split(split)
    masks = []
    for shard in data.meta["splits"][split]["shards"]:
        path = data.dir / shard["file"].replace(".bin", MASK_SUFFIX)
        if not path.exists() or path.stat().st_size != shard["tokens"]:
            raise ValueError(f"mask shard {path} is missing or truncated (expected {shard['tokens']} bytes)")
        if shard["tokens"]:
            masks.append(np.memmap(path, dtype=np.uint8, mode="r"))
    docs_path = data.dir / f"{split}{DOCS_SUFFIX}"
    if not docs_path.exists() or docs_path.stat().st_size % 24:
        raise ValueError(f"document index {docs_path} is missing or truncated")
    index = np.fromfile(docs_path, dtype=np.int64).reshape(-1, 3)
    sizes = np.asarray([m.shape[0] for m in masks], dtype=np.int64)
    bad = (index[:, 0] < 0) | (index[:, 0] >= sizes.size) | (index[:, 1] < 0) | (index[:, 2] < 1)
    if not bad.any() and index.size:
        bad = index[:, 1] + index[:, 2] > sizes[index[:, 0]]
    if bad.any():
        raise ValueError(f"document index {docs_path} points outside the shards (row {int(np.argmax(bad))})")
    return Documents(token_split.shards, masks, index)
