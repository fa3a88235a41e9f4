"""Tokenizer: ``tokenizer.json`` through the ``tokenizers`` library (GPT-NeoX-20B BPE for the 7B)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers


class Tokenizer:
    """Thin wrapper: encode/decode, special ids and incremental (streaming) detokenisation."""

    def __init__(self, tokenizer: HFTokenizer, bos_token_id: int | None = 0, eos_token_id: int | None = 2,
                 pad_token_id: int | None = 1, add_bos: bool = False):
        self.tok = tokenizer
        self.bos_token_id, self.eos_token_id, self.pad_token_id = bos_token_id, eos_token_id, pad_token_id
        self.add_bos = add_bos

    @classmethod
    def from_dir(cls, directory: str | os.PathLike) -> Tokenizer:
        """Read ``tokenizer.json`` (and special ids from ``config.json`` when present)."""
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: the model directory has no tokenizer")
        ids = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
        add_bos = False
        cfg = directory / "config.json"
        if cfg.exists():
            data = json.loads(cfg.read_text())
            for key in ids:
                value = data.get(key, ids[key])
                ids[key] = value[0] if isinstance(value, list) else value
            add_bos = bool(data.get("force_bos_token_insert", False))
        return cls(HFTokenizer.from_file(str(path)), add_bos=add_bos, **ids)

    @classmethod
    def byte_level(cls) -> Tokenizer:
        """A merge-free byte-level BPE (ids 0-2 specials, then 256 bytes): for random test/bench models."""
        vocab = {"<|endoftext|>": 0, "<|padding|>": 1, "<|eos|>": 2}
        for b, ch in enumerate(pre_tokenizers.ByteLevel.alphabet()):
            vocab[ch] = 3 + b
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str, add_bos: bool | None = None, release_gil: bool = False) -> list[int]:
        """Token ids of ``text``. ``release_gil``: through ``encode_batch``, which lets other Python threads run
        while Rust tokenises (``encode`` holds the GIL throughout); the same ids."""
        if release_gil:
            ids = self.tok.encode_batch([text], add_special_tokens=False)[0].ids
        else:
            ids = self.tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def max_text_bytes_per_token(self) -> int:
        """An upper bound on the UTF-8 bytes of input text one token can cover: a text of more than ``n`` times
        this many bytes has more than ``n`` tokens. The longest single token's text (specials included), times 4
        when the tokenizer normalises (NFC/NFKC can shrink text up to 4x, e.g. a 4-byte math letter to 'A')."""
        texts = self.tok.decode_batch([[i] for i in range(self.vocab_size)], skip_special_tokens=False)
        longest = max(1, *(len(t.encode("utf-8", "surrogatepass")) for t in texts))
        return longest * (4 if self.tok.normalizer is not None else 1)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def incremental_decoder(self) -> IncrementalDecoder:
        return IncrementalDecoder(self)


class IncrementalDecoder:
    """Turns a stream of token ids into text pieces, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes (may be empty)."""
        self.ids.append(int(token_id))
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever text is still held back (call at the end of the stream)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        decode = self.tokenizer.decode
        prefix_text = decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = decode(self.ids[self.prefix_offset:])
        if (new_text.endswith("\ufffd") and not final) or len(new_text) <= len(prefix_text):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return new_text[len(prefix_text):]
