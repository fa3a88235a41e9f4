"""Chat / instruction data: the loss mask follows the chat template's assistant turns, documents are
packed whole and the state never crosses them, masked tokens get no gradient, SFT trains."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from fastxlstm.cli import app
from fastxlstm.serving.chat_template import ChatTemplate
from fastxlstm.tokenizer import Tokenizer
from fastxlstm.training.chat_data import load_documents, prepare_chat
from fastxlstm.training.config import TrainConfig
from fastxlstm.training.data import TokenShards
from fastxlstm.training.loader import IGNORE_INDEX, DocumentSampler, eval_documents
from fastxlstm.training.trainer import Trainer

from .training_helpers import tiny_config

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "xlstm-shakespeare-10m"
INSTRUCT = ROOT / "data" / "instructions" / "shakespeare-instruct.jsonl"

CHATS = [
    {"messages": [{"role": "system", "content": "Answer as a player would."},
                  {"role": "user", "content": "Who is the Prince of Denmark?"},
                  {"role": "assistant", "content": "Hamlet, my lord."},
                  {"role": "user", "content": "And his mother?"},
                  {"role": "assistant", "content": "Gertrude, the Queen."}]},
    {"messages": [{"role": "user", "content": "Say a line."}, {"role": "assistant", "content": "To be, or not."}]},
]


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chat")
    records = CHATS * 20 + [{"messages": [{"role": "user", "content": f"Count {i}."},
                                          {"role": "assistant", "content": " ".join(["and"] * (i % 7 + 1))}]}
                            for i in range(60)]
    prepare_chat(MODEL, [_write_jsonl(tmp / "chat.jsonl", records)], tmp / "data", "chat", val_fraction=0.2)
    return tmp / "data"


def test_mask_covers_exactly_the_assistant_turns(tmp_path):
    prepare_chat(MODEL, [_write_jsonl(tmp_path / "c.jsonl", CHATS)], tmp_path / "d", "chat",
                 val_inputs=[_write_jsonl(tmp_path / "v.jsonl", CHATS[1:])])
    docs = load_documents(TokenShards(tmp_path / "d"), "train")
    tok = Tokenizer.from_dir(MODEL)
    ids, mask = docs.document(0)
    assert len(docs) == 2 and mask.dtype == np.bool_ and ids[-1] == tok.eos_token_id and mask[-1]
    text = ChatTemplate().render(CHATS[0]["messages"], add_generation_prompt=False)
    assert tok.decode(ids[:-1].tolist()) == text  # the rendered conversation, tokenised whole
    # trained runs of tokens are the assistant turns (content and end of turn), nothing else
    runs, cur = [], []
    for t, m in zip(ids[:-1].tolist(), mask[:-1].tolist()):
        if m:
            cur.append(t)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    runs.append(tok.decode(cur))
    assert runs == [" Hamlet, my lord.\n\n", " Gertrude, the Queen.\n\n"]
    context = tok.decode([t for t, m in zip(ids.tolist(), mask.tolist()) if not m])
    assert "Who is the Prince" in context and "Assistant:" in context and "Hamlet" not in context
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert meta["format"] == "chat" and meta["chat_template"] == "default"
    assert meta["splits"]["val"]["documents"] == 1 and meta["trained_tokens"]["train"] == int(
        docs.document(0)[1].sum() + docs.document(1)[1].sum())


def test_instruct_records_are_chats_and_the_model_template_is_used(tmp_path):
    inst = _write_jsonl(tmp_path / "i.jsonl", [{"prompt": "Say a line.", "completion": "To be, or not."}])
    prepare_chat(MODEL, [inst], tmp_path / "a", "instruct", val_fraction=0.0)
    prepare_chat(MODEL, [_write_jsonl(tmp_path / "c.jsonl", CHATS[1:])], tmp_path / "b", "chat", val_fraction=0.0)
    a, b = (load_documents(TokenShards(tmp_path / d), "train").document(0) for d in "ab")
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    # a model directory with its own template (tokenizer_config.json chat_template) uses that one
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    shutil.copy(MODEL / "tokenizer.json", model_dir)
    cfg = json.loads((MODEL / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                            "{% if add_generation_prompt %}<assistant>{% endif %}")
    (model_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    meta = prepare_chat(model_dir, [inst], tmp_path / "t", "instruct", val_fraction=0.0)
    ids, mask = load_documents(TokenShards(tmp_path / "t"), "train").document(0)
    tok = Tokenizer.from_dir(MODEL)
    assert tok.decode(ids[:-1].tolist()) == "<user>Say a line.\n<assistant>To be, or not.\n"
    assert tok.decode(ids[mask][:-1].tolist()) == "To be, or not.\n"
    assert meta["chat_template"].endswith("tokenizer_config.json")


@pytest.mark.parametrize(("record", "message"), [
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
    ({"messages": [{"role": "narrator", "content": "hi"}]}, r"messages\[0\] must be"),
    ({"prompt": "p"}, "expected string fields 'prompt' and 'completion'"),
])
def test_bad_records_are_reported_with_file_and_line(tmp_path, record, message):
    path = tmp_path / "bad.jsonl"
    fmt = "instruct" if "prompt" in record else "chat"
    good = CHATS[1] if fmt == "chat" else {"prompt": "a", "completion": "b"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=message) as e:
        prepare_chat(MODEL, [path], tmp_path / "o", fmt)
    assert f"{path}:2" in str(e.value)


def test_sampler_packs_whole_documents_deterministically(chat_dir):
    docs = load_documents(TokenShards(chat_dir), "train")
    s = DocumentSampler(docs, seq_len=64, micro_batch_size=2, grad_accum=2, world_size=2, rank=1, seed=3)
    again = DocumentSampler(docs, seq_len=64, micro_batch_size=2, grad_accum=2, world_size=2, rank=1, seed=3)
    seen = []
    for step in range(12):  # more than one epoch
        rows = s.rows(step)
        assert rows == again.rows(step) and len(rows) == 8
        for row in rows:
            assert 0 < sum(int(s._positions[j]) for j in row) <= 64 and len(set(row)) == len(row)
        seen += [j for row in rows for j in row]
        x, y = s.batch(step, 1)
        assert torch.equal(x, again.batch(step, 1)[0]) and torch.equal(y, again.batch(step, 1)[1])
        mine = rows[(1 * 2 + 1) * 2: (1 * 2 + 1) * 2 + 2]
        assert x.shape[0] == sum(len(r) for r in mine)  # one row per document
    assert set(seen) == set(range(len(s._keep)))  # an epoch covers every document
    assert s.rows(0) != DocumentSampler(docs, 64, 2, 2, 2, 1, seed=4).rows(0)


def test_masked_tokens_get_no_gradient_and_documents_do_not_share_state(chat_dir, tmp_path):
    cfg = TrainConfig.load(tiny_config(tmp_path / "c.yaml", chat_dir, tmp_path / "run"), ["data.seq_len=64"])
    trainer = Trainer(cfg)
    x, y = trainer.sampler.batch(0, 0)
    assert x.shape[0] > 4 and (y == IGNORE_INDEX).any() and (y != IGNORE_INDEX).any()
    grabbed = {}

    def grab(module, inputs, out):
        out.retain_grad()
        grabbed["out"] = out

    handle = trainer.model.lm_head.register_forward_hook(grab)
    trainer.micro_loss(x, y).backward()
    g = grabbed["out"].grad.abs().sum(-1)
    assert (g[y == IGNORE_INDEX] == 0).all() and (g[y != IGNORE_INDEX] > 0).all()
    handle.remove()
    # the batch's loss is the sum of every document's loss run alone from the zero state ...
    model = trainer.model
    lengths = [int((y[r] != IGNORE_INDEX).nonzero().max()) + 1 for r in range(x.shape[0])]  # each ends in eos
    assert any(n < x.shape[1] for n in lengths)  # some rows are padded
    with torch.no_grad():
        alone = sum(F.cross_entropy(model(x[r : r + 1, :n])[0][0], y[r, :n], ignore_index=IGNORE_INDEX,
                                    reduction="sum") for r, n in enumerate(lengths))
        batched = trainer.micro_loss(x, y)
        # ... which carrying the state from one document into the next would not give
        packed_x = torch.cat([x[r, :n] for r, n in enumerate(lengths)])[None]
        packed_y = torch.cat([y[r, :n] for r, n in enumerate(lengths)])[None]
        crossing = trainer.micro_loss(packed_x, packed_y)
    assert batched.item() == pytest.approx(alone.item(), rel=1e-5)
    assert abs(crossing.item() - alone.item()) > 1e-3 * alone.item()


def test_eval_documents_split_evenly(chat_dir):
    docs = load_documents(TokenShards(chat_dir), "val")
    per_rank = [[y.shape[0] for _, y in eval_documents(docs, 64, 3, 10**9, 2, r)] for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) and sum(per_rank[0]) == sum(per_rank[1]) == len(docs) // 2


def test_cli_prepare_chat_and_sft_lowers_heldout_loss(tmp_path):
    r = CliRunner().invoke(app, ["data", "prepare", "--tokenizer", str(MODEL), "--input", str(INSTRUCT),
                                 "--out", str(tmp_path / "d"), "--format", "instruct", "--val-fraction", "0.1"])
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert meta["format"] == "instruct" and meta["splits"]["val"]["documents"] > 30
    cfg = TrainConfig.load(tiny_config(
        tmp_path / "c.yaml", tmp_path / "d", tmp_path / "run",
        model={"preset": None, "backend": "reference", "overrides": {"embedding_dim": 32, "num_blocks": 1,
                                                                     "num_heads": 2, "chunk_size": 32}},
        train={"steps": 12, "micro_batch_size": 2}, eval={"every": 12, "tokens": 1200, "batch_size": 16}),
        ["data.seq_len=96"])
    trainer = Trainer(cfg)
    before = trainer.evaluate()
    summary = trainer.train()
    assert summary["final_val_loss"] < before - 1.0, (before, summary["final_val_loss"])
    assert summary["tokens"] == sum(trainer.sampler.tokens(s) for s in range(12))
