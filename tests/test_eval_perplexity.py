"""`fastxlstm eval perplexity` against transformers' xLSTMForCausalLM on the same tokens (both protocols)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fastxlstm.cli import app
from fastxlstm.config import XLSTMConfig
from fastxlstm.eval.perplexity import load_documents, prefix_token
from fastxlstm.tokenizer import Tokenizer
from fastxlstm.training.data import write_token_splits

from .helpers import hf_twin, perturbed_model

CFG = XLSTMConfig(vocab_size=320, embedding_dim=64, num_blocks=2, num_heads=2, chunk_size=16)
TEXTS = ["The quick brown fox jumps over the lazy dog. " * 6,
         "xLSTM is a recurrent language model with matrix memory. Ein Bär läuft über die Brücke — schön!",
         "日本語のテキストも少し。" * 3 + " The lazy dog sleeps."]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer_dir):
    root = tmp_path_factory.mktemp("ppl")
    model = perturbed_model(CFG)
    model.save_pretrained(str(root / "m"))
    shutil.copy(tiny_tokenizer_dir / "tokenizer.json", root / "m" / "tokenizer.json")
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return root / "m", data, hf_twin(model)


def _hf_nll(hf, seqs: list[list[int]]) -> tuple[float, int]:
    total, count = 0.0, 0
    for s in seqs:
        ids = torch.tensor([s])
        with torch.no_grad():
            lp = torch.log_softmax(hf(ids[:, :-1], use_cache=False).logits.double(), -1)
        total -= lp.gather(-1, ids[:, 1:, None]).sum().item()
        count += len(s) - 1
    return total, count


def _run(args):
    result = CliRunner().invoke(app, ["eval", "perplexity", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.parametrize("window", [None, 24, 64])
def test_perplexity_equals_transformers(setup, tmp_path, window):
    path, data, hf = setup
    tok = Tokenizer.from_dir(path)
    docs = load_documents(data, tok)
    prefix = prefix_token(tok)
    assert [d.ids for d in docs] == [tok.encode(t) + [tok.eos_token_id] for t in TEXTS]
    if window is None:  # each document alone, from its context-only prefix token
        seqs = [[prefix, *d.ids] for d in docs]
    else:  # the concatenated stream cut into windows of `window` inputs (+1 for the last target)
        stream = [prefix] + [t for d in docs for t in d.ids]
        seqs = [stream[i:i + window + 1] for i in range(0, len(stream) - 1, window)]
    total, count = _hf_nll(hf, seqs)
    out = tmp_path / "ppl.json"
    _run(["--model", path, "--data", data, "--json", out, "--batch-size", 2, "--chunk-size", 16,
          *(["--window", window] if window else [])])
    got = json.loads(out.read_text())
    assert got["tokens"] == count == sum(len(d.ids) for d in docs)
    assert got["nll"] == pytest.approx(total / count, rel=1e-4)
    assert got["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)
    n_bytes = sum(len(t.encode()) for t in TEXTS)
    assert got["bytes"] == n_bytes
    assert got["bits_per_byte"] == pytest.approx(total / math.log(2) / n_bytes, rel=1e-4)
    assert got["mode"] == ("document" if window is None else "window")


def test_token_shards_are_split_into_documents(setup, tmp_path):
    path, _, hf = setup
    tok = Tokenizer.from_dir(path)
    eos = tok.eos_token_id
    docs = [tok.encode(t) + [eos] for t in TEXTS]
    write_token_splits(tmp_path / "shards", {"val": np.concatenate(docs), "train": np.array([5, eos])},
                       vocab_size=300, eos_token_id=eos)
    got = load_documents(tmp_path / "shards", tok)
    assert [d.ids for d in got] == docs
    total, count = _hf_nll(hf, [[prefix_token(tok), *d] for d in docs])
    result = _run(["--model", path, "--data", tmp_path / "shards"])
    assert f"mean NLL {total / count:.4f}" in result.stdout


def test_bad_data_fails_cleanly(setup, tmp_path):
    path, _, _ = setup
    args = ["eval", "perplexity", "--model", str(path), "--data"]
    result = CliRunner().invoke(app, [*args, str(tmp_path / "nope")])
    assert result.exit_code == 1 and "does not exist" in result.stderr
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    result = CliRunner().invoke(app, [*args, str(tmp_path / "bad.jsonl")])
    assert result.exit_code == 1 and "bad.jsonl:1" in result.stderr
