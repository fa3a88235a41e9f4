"""Tokenizer wrapper: round trips, special ids, streaming detokenisation of multi-byte text."""

from __future__ import annotations

import json

import pytest

from fastxlstm.tokenizer import Tokenizer

TEXT = "Ein Bär läuft über die Brücke — schön! 日本語のテキスト. The quick brown fox."


def test_round_trip_and_special_ids(tiny_tokenizer_dir):
    tok = Tokenizer.from_dir(tiny_tokenizer_dir)
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 2, 1)
    assert tok.encode("hi", add_bos=True)[0] == 0


def test_config_special_ids_and_force_bos(tiny_tokenizer_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_text((tiny_tokenizer_dir / "tokenizer.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [2, 1], "bos_token_id": 0,
                                                     "force_bos_token_insert": True}))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.eos_token_id == 2 and tok.encode("a")[0] == 0


def test_incremental_decoding_equals_full_decode(tiny_tokenizer_dir):
    tok = Tokenizer.from_dir(tiny_tokenizer_dir)
    ids = tok.encode(TEXT)
    dec = tok.incremental_decoder()
    pieces = [dec.add(t) for t in ids] + [dec.flush()]
    assert "".join(pieces) == TEXT
    assert all("\ufffd" not in p for p in pieces)  # no half characters were ever emitted


def test_byte_level_fallback_tokenizer():
    tok = Tokenizer.byte_level()
    assert tok.vocab_size == 259
    assert tok.decode(tok.encode(TEXT)) == TEXT


def test_missing_tokenizer_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
