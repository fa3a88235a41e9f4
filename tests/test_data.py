"""Data preparation: BPE training, token shards, held-out splits, the CLI, and input errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from fastxlstm.cli import app
from fastxlstm.tokenizer import Tokenizer
from fastxlstm.training.data import TokenShards, is_heldout, prepare, token_dtype, write_token_splits
from fastxlstm.training.tokenizer_train import train_bpe

TEXTS = [
    "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him.",
    "If music be the food of love, play on; give me excess of it, that, surfeiting, the appetite may sicken.",
    "Now is the winter of our discontent made glorious summer by this sun of York.",
    "All the world's a stage, and all the men and women merely players.",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    (root / "docs").mkdir()
    for i, t in enumerate(TEXTS * 3):
        (root / "docs" / f"doc{i:02d}.txt").write_text(f"{t} ({i})\n" * 5)
    with (root / "extra.jsonl").open("w") as fh:
        for i, t in enumerate(TEXTS):
            fh.write(json.dumps({"text": t.upper(), "id": i}) + "\n")
    return root


@pytest.fixture(scope="module")
def bpe(corpus, tmp_path_factory):
    return train_bpe([corpus / "docs", corpus / "extra.jsonl"], tmp_path_factory.mktemp("tok"), vocab_size=400,
                     progress=False)


def test_token_dtype():
    assert token_dtype(8192) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(50304) == np.uint16
    with pytest.raises(ValueError):
        token_dtype(0)


def test_bpe_tokenizer_round_trips_and_has_specials(bpe):
    tok = Tokenizer.from_dir(bpe)
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id) == (0, 1, 2)
    assert 259 < tok.vocab_size <= 400
    text = "Lend me your ears — ünïcödé survives, too."
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("Romans, countrymen")) < len("Romans, countrymen")  # merges were learned


def test_prepare_shards_match_tokenizer_and_meta(bpe, corpus, tmp_path):
    meta = prepare(bpe, [corpus / "docs", corpus / "extra.jsonl"], tmp_path / "out", val_fraction=0.25,
                   min_docs_for_doc_split=4, progress=False)
    shards = TokenShards(tmp_path / "out")
    assert shards.dtype == np.uint16 and shards.vocab_size == meta["vocab_size"]
    train, val = shards.split("train"), shards.split("val")
    n_docs = len(TEXTS) * 4
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == n_docs
    assert train.num_tokens == meta["splits"]["train"]["tokens"] > 0
    assert val.num_tokens == meta["splits"]["val"]["tokens"] > 0  # 16 docs at 25%: some held out
    # every document ends with eos; decoding the streams gives back exactly the documents
    tok = Tokenizer.from_dir(tmp_path / "out")
    stream = np.concatenate([np.asarray(s) for s in train.shards + val.shards]).astype(np.int64)
    assert int((stream == 2).sum()) == n_docs
    docs = [tok.decode(d.tolist()) for d in np.split(stream, np.flatnonzero(stream == 2) + 1) if d.size > 1]
    expected = sorted([(corpus / "docs" / f"doc{i:02d}.txt").read_text() for i in range(12)]
                      + [t.upper() for t in TEXTS])
    assert sorted(d.replace("<|eos|>", "") for d in docs) == expected
    # the split is a function of the text alone
    val_docs = {t.upper() for t in TEXTS if is_heldout(t.upper(), 0.25)}
    assert meta["splits"]["val"]["documents"] >= len(val_docs)


def test_heldout_hash_holds_out_the_requested_share():
    texts = [f"document {i}" for i in range(4000)]
    for fraction, tol in ((0.25, 0.03), (0.1, 0.02)):
        share = sum(is_heldout(t, fraction) for t in texts) / len(texts)
        assert abs(share - fraction) < tol, (fraction, share)
    assert not any(is_heldout(t, 0.0) for t in texts)
    # nested: a document held out at 10% stays held out at 25%
    assert all(is_heldout(t, 0.25) for t in texts if is_heldout(t, 0.1))


def test_prepare_explicit_heldout_and_small_shards(bpe, corpus, tmp_path):
    meta = prepare(bpe, [corpus / "docs"], tmp_path / "out", val_inputs=[corpus / "extra.jsonl"],
                   shard_tokens=100, progress=False)
    assert meta["split_mode"] == "explicit"
    assert meta["splits"]["val"]["documents"] == len(TEXTS)
    assert len(meta["splits"]["train"]["shards"]) > 1
    assert all(s["tokens"] <= 100 for s in meta["splits"]["train"]["shards"])


def test_prepare_few_documents_holds_out_tails(bpe, corpus, tmp_path):
    meta = prepare(bpe, [corpus / "docs" / "doc00.txt", corpus / "docs" / "doc01.txt"], tmp_path / "o",
                   val_fraction=0.1, progress=False)
    assert meta["split_mode"] == "document_tails"
    total = meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]
    assert 0.05 * total < meta["splits"]["val"]["tokens"] < 0.15 * total


def test_prepare_errors(bpe, corpus, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare(bpe, [tmp_path / "nope.txt"], tmp_path / "o", progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        prepare(bpe, [bad], tmp_path / "o", progress=False)
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="string field 'text'"):
        prepare(bpe, [wrong], tmp_path / "o", progress=False)
    with pytest.raises(FileNotFoundError):
        TokenShards(tmp_path / "empty")


def test_truncated_shard_is_reported(bpe, corpus, tmp_path):
    prepare(bpe, [corpus / "docs"], tmp_path / "o", progress=False)
    shard = tmp_path / "o" / "train-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(ValueError, match="truncated"):
        TokenShards(tmp_path / "o").split("train")


def test_cli_tokenizer_and_prepare(corpus, tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["data", "tokenizer", "--train", str(corpus / "docs"), "--out", str(tmp_path / "t"),
                            "--vocab-size", "300"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["data", "prepare", "--tokenizer", str(tmp_path / "t"), "--input", str(corpus / "docs"),
                            "--input", str(corpus / "extra.jsonl"), "--out", str(tmp_path / "d"),
                            "--val-fraction", "0.2"])
    assert r.exit_code == 0, r.output
    assert "uint16 tokens, vocab 300" in r.output
    r = runner.invoke(app, ["data", "prepare", "--tokenizer", str(tmp_path / "t"), "--input", str(tmp_path / "x"),
                            "--out", str(tmp_path / "d2")], env={"COLUMNS": "300"})
    assert r.exit_code == 2 and "does not exist" in r.output


def test_write_token_splits_round_trips_through_shards(tmp_path):
    rng = np.random.default_rng(0)
    train, val = rng.integers(0, 70_000, 2_500), rng.integers(0, 70_000, 40)
    out = write_token_splits(tmp_path / "d", {"train": train, "val": val}, 70_000, shard_tokens=1_000)
    data = TokenShards(out)
    assert data.dtype == np.uint32 and data.vocab_size == 70_000
    split = data.split("train")
    assert [s.shape[0] for s in split.shards] == [1_000, 1_000, 500]
    np.testing.assert_array_equal(np.concatenate(split.shards), train)
    np.testing.assert_array_equal(np.concatenate(data.split("val").shards), val)
    with pytest.raises(ValueError, match="split 'val'.*\\[0, 100\\)"):
        write_token_splits(tmp_path / "e", {"train": train % 100, "val": np.array([5, 100])}, 100)
