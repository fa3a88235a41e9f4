"""Token shards: tokenise text into memory-mapped ``uint16``/``uint32`` files with a held-out split.

Layout of a prepared directory::

    meta.json                 dtype, vocab size, special ids, shard list and token counts per split
    tokenizer.json            copy of the tokenizer used (plus its config files when present)
    train-00000.bin ...       raw little-endian token ids, documents separated by ``eos_token_id``
    val-00000.bin ...

Documents are assigned to the held-out (``val``) split by a hash of their text, so the split
does not depend on input order or on the number of worker threads. With fewer than
``min_docs_for_doc_split`` documents the tail of every document is held out instead.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
META_NAME = "meta.json"
FORMAT_VERSION = 1


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id fits, else ``uint32``."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


# ----------------------------------------------------------------------------- input
def _expand_inputs(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            suffixes = TEXT_SUFFIXES + JSONL_SUFFIXES
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
            if not found:
                raise FileNotFoundError(f"{path} holds no {'/'.join(TEXT_SUFFIXES + JSONL_SUFFIXES)} files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"input {str(item)!r} does not exist")
    if not files:
        raise ValueError("no input files given")
    return files


def iter_jsonl(path: Path) -> Iterator[tuple[int, object]]:
    """``(line number, record)`` for every non-blank line of a JSON-lines file; a line that is not JSON
    raises a ValueError naming the file and line."""
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e


def iter_documents(inputs: Iterable[str | os.PathLike], text_key: str = "text") -> Iterator[str]:
    """Documents from text files (one document each) and JSON-lines files (one per line, ``text_key``)."""
    for path in _expand_inputs(inputs):
        if path.suffix.lower() in JSONL_SUFFIXES:
            for lineno, record in iter_jsonl(path):
                if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
                    raise ValueError(f"{path}:{lineno}: expected an object with a string field {text_key!r}")
                if record[text_key]:
                    yield record[text_key]
        else:
            text = path.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                yield text


def _count_documents(files: list[Path]) -> int:
    """Upper bound on the document count (non-empty JSON lines, one per text file), without parsing."""
    n = 0
    for path in files:
        if path.suffix.lower() in JSONL_SUFFIXES:
            with path.open("rb") as fh:
                n += sum(1 for line in fh if line.strip())
        else:
            n += 1
    return n


def is_heldout(text: str, val_fraction: float) -> bool:
    """Deterministic document-level split: a hash of the text below ``val_fraction``."""
    digest = hashlib.blake2b(text.encode("utf-8", errors="replace"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


# ------------------------------------------------------------------------------ write
class _ShardWriter:
    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int, suffix: str = ".bin"):
        self.out, self.split, self.dtype, self.shard_tokens, self.suffix = out, split, dtype, shard_tokens, suffix
        self.shards: list[dict] = []
        self._fh = None
        self._count = 0
        self.total = 0

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):05d}{self.suffix}"
        self.shards.append({"file": name, "tokens": 0})
        self._fh = open(self.out / name, "wb")  # noqa: SIM115 - closed in close()/_open()
        self._count = 0

    def start_document(self, n: int) -> None:
        """Start a new shard unless the next ``n`` tokens fit in the current one (whole documents)."""
        if n > self.shard_tokens:
            raise ValueError(f"a document of {n} tokens is longer than shard_tokens={self.shard_tokens}")
        if self._fh is None or self._count + n > self.shard_tokens:
            self.close()
            self._open()

    def write(self, ids: np.ndarray) -> None:
        while ids.size:
            if self._fh is None or self._count >= self.shard_tokens:
                self.close()
                self._open()
            take = min(ids.size, self.shard_tokens - self._count)
            ids[:take].astype(self.dtype, copy=False).tofile(self._fh)
            self._count += take
            self.total += take
            self.shards[-1]["tokens"] += take
            ids = ids[take:]

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _batched(it: Iterable, n: int) -> Iterator[list]:
    batch: list = []
    for item in it:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _open_tokenizer(tokenizer_path: str | os.PathLike):
    """``(tokenizer, its directory, its file)`` of ``tokenizer_path``, a ``tokenizer.json`` or a directory holding
    one (the directory is where its config files are); FileNotFoundError naming the file if there is none."""
    from tokenizers import Tokenizer as HFTokenizer

    tok_path = Path(tokenizer_path)
    tok_dir = tok_path if tok_path.is_dir() else tok_path.parent
    tok_file = tok_dir / "tokenizer.json" if tok_path.is_dir() else tok_path
    if not tok_file.exists():
        raise FileNotFoundError(f"tokenizer {tok_file} not found")
    return HFTokenizer.from_file(str(tok_file)), tok_dir, tok_file


def _fresh_out_dir(out_dir: str | os.PathLike) -> Path:
    """``out_dir``, made if missing, without the shards (``*.bin``) an earlier run left there."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("*.bin")):
        old.unlink()
    return out


def prepare(
    tokenizer_path: str | os.PathLike, inputs: Iterable[str | os.PathLike], out_dir: str | os.PathLike,
    val_fraction: float = 0.01, text_key: str = "text", shard_tokens: int = 100_000_000,
    batch_docs: int = 256, min_docs_for_doc_split: int = 20, progress: bool = True,
    val_inputs: Iterable[str | os.PathLike] | None = None,
) -> dict:
    """Tokenise ``inputs`` into shards under ``out_dir``; returns the written ``meta.json`` dict.

    ``tokenizer_path`` is a ``tokenizer.json`` or a directory holding one. Encoding runs in
    parallel on all cores (the ``tokenizers`` library's batch encoder). With ``val_inputs`` the
    held-out split is exactly those documents and ``val_fraction`` is ignored.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens <= 0:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    tok, tok_dir, tok_file = _open_tokenizer(tokenizer_path)
    vocab_size = tok.get_vocab_size()
    special = _special_ids(tok_dir, tok)
    eos = special["eos_token_id"]
    dtype = token_dtype(vocab_size)
    files = _expand_inputs(inputs)
    val_files = _expand_inputs(val_inputs) if val_inputs else []
    total_bytes = sum(f.stat().st_size for f in files + val_files)

    out = _fresh_out_dir(out_dir)
    doc_split = bool(val_files) or _count_documents(files) >= min_docs_for_doc_split
    writers = {s: _ShardWriter(out, s, dtype, shard_tokens) for s in ("train", "val")}
    counts = {"train": 0, "val": 0}
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenising", disable=not progress)
    try:
        if val_files:
            stream = itertools.chain(((("train", d) for d in iter_documents(files, text_key))),
                                     (("val", d) for d in iter_documents(val_files, text_key)))
        else:
            stream = ((None, d) for d in iter_documents(files, text_key))
        for batch in _batched(stream, batch_docs):
            encs = tok.encode_batch([text for _, text in batch], add_special_tokens=False)
            for (fixed, text), enc in zip(batch, encs):
                ids = np.asarray(enc.ids + ([eos] if eos is not None else []), dtype=np.int64)
                if doc_split:
                    split = fixed or ("val" if is_heldout(text, val_fraction) else "train")
                    writers[split].write(ids)
                    counts[split] += 1
                else:
                    cut = ids.size - int(round(ids.size * val_fraction))
                    writers["train"].write(ids[:cut])
                    writers["val"].write(ids[cut:])
                    counts["train"] += 1
                    counts["val"] += int(cut < ids.size)
                bar.update(len(text.encode("utf-8", errors="replace")))
    finally:
        bar.close()
        for w in writers.values():
            w.close()
    if writers["train"].total == 0:
        raise ValueError("no training tokens were produced (empty inputs, or every document held out)")
    for fname in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        src = tok_dir / fname if fname != "tokenizer.json" else tok_file
        if src.exists() and src.resolve() != (out / fname).resolve():
            shutil.copy2(src, out / fname)
    meta = _write_meta(
        out, dtype, vocab_size, special, writers, counts,
        split_mode="explicit" if val_files else ("documents" if doc_split else "document_tails"),
        val_fraction=val_fraction, sources=[str(f) for f in files], val_sources=[str(f) for f in val_files],
    )
    return meta


def _write_meta(
    out: Path, dtype: np.dtype, vocab_size: int, special: dict[str, int | None],
    writers: dict[str, _ShardWriter], documents: dict[str, int], split_mode: str, **extra,
) -> dict:
    """Write ``meta.json`` describing the shards ``writers`` produced; returns it."""
    meta = {
        "format_version": FORMAT_VERSION,
        "dtype": dtype.name,
        "vocab_size": vocab_size,
        **special,
        "split_mode": split_mode,
        **extra,
        "splits": {
            s: {"tokens": w.total, "documents": documents[s], "shards": w.shards} for s, w in writers.items()
        },
    }
    (out / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def write_token_splits(
    out_dir: str | os.PathLike, splits: dict[str, np.ndarray], vocab_size: int, *,
    bos_token_id: int | None = 0, eos_token_id: int | None = 2, pad_token_id: int | None = 1,
    split_mode: str = "arrays", shard_tokens: int = 100_000_000,
) -> Path:
    """A prepared-data directory (same layout as :func:`prepare`) from ready token arrays, one per
    split, e.g. synthetic data for throughput runs and tests. Each array counts as one document."""
    out = _fresh_out_dir(out_dir)
    dtype = token_dtype(vocab_size)
    writers = {}
    for name, ids in splits.items():
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(f"split {name!r}: token ids must lie in [0, {vocab_size}), "
                             f"got [{ids.min()}, {ids.max()}]")
        writers[name] = _ShardWriter(out, name, dtype, shard_tokens)
        writers[name].write(ids)
        writers[name].close()
    special = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
    _write_meta(out, dtype, vocab_size, special, writers, {name: 1 for name in splits}, split_mode)
    return out


def _special_ids(tok_dir: Path, tok) -> dict[str, int | None]:
    """bos/eos/pad ids: from ``tokenizer_config.json`` names when present, else the usual specials."""
    ids: dict[str, int | None] = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    cfg = tok_dir / "tokenizer_config.json"
    names: dict[str, str] = {}
    if cfg.exists():
        data = json.loads(cfg.read_text())
        for key in ("bos_token", "eos_token", "pad_token"):
            value = data.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                names[key] = value
    defaults = {"bos_token": ["<|endoftext|>", "<s>"], "eos_token": ["<|eos|>", "<|endoftext|>", "</s>"],
                "pad_token": ["<|padding|>", "<pad>"]}
    for key, candidates in defaults.items():
        for name in ([names[key]] if key in names else []) + candidates:
            tid = tok.token_to_id(name)
            if tid is not None:
                ids[f"{key}_id"] = tid
                break
    return ids


# ------------------------------------------------------------------------------- read
@dataclass
class TokenSplit:
    """One split of a prepared directory as a list of memory-mapped shards."""

    shards: list[np.memmap]

    @property
    def num_tokens(self) -> int:
        return sum(int(s.shape[0]) for s in self.shards)


class TokenShards:
    """Read-only view of a prepared directory (``meta.json`` plus shards)."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        meta_path = self.dir / META_NAME
        if not meta_path.exists():
            raise FileNotFoundError(f"{meta_path} not found: run `fastxlstm data prepare` first")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{meta_path}: unsupported format_version {self.meta.get('format_version')}")
        self.dtype = np.dtype(self.meta["dtype"])
        self.vocab_size = int(self.meta["vocab_size"])
        self.eos_token_id = self.meta.get("eos_token_id")
        self._splits: dict[str, TokenSplit] = {}

    def split(self, name: str) -> TokenSplit:
        if name not in self.meta["splits"]:
            raise KeyError(f"split {name!r} not in {self.dir}; have {', '.join(self.meta['splits'])}")
        if name not in self._splits:
            maps = []
            for shard in self.meta["splits"][name]["shards"]:
                path = self.dir / shard["file"]
                expected = shard["tokens"] * self.dtype.itemsize
                if not path.exists() or path.stat().st_size != expected:
                    raise ValueError(f"shard {path} is missing or truncated (expected {expected} bytes)")
                if shard["tokens"]:
                    maps.append(np.memmap(path, dtype=self.dtype, mode="r"))
            self._splits[name] = TokenSplit(maps)
        return self._splits[name]

    @property
    def tokenizer_dir(self) -> Path | None:
        return self.dir if (self.dir / "tokenizer.json").exists() else None
