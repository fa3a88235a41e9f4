"""`fastxlstm eval niah`: the prompts (exact length, needle where the depth says, seeded), RULER's scorer on
hand-made answers, the whole harness against a known answer (an oracle that can only read the last W tokens of
the prompt: it must score 100 exactly where the needle lies in that window and 0 elsewhere), and the engine's
answers equal the reference greedy loop on the embedded model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fastxlstm.checkpoint import load_model_and_tokenizer
from fastxlstm.cli import app
from fastxlstm.engine import LLM
from fastxlstm.eval import niah

from .helpers import greedy_reference

MODEL = Path(__file__).resolve().parents[1] / "models" / "xlstm-shakespeare-10m"


@pytest.fixture(scope="module")
def embedded():
    return load_model_and_tokenizer(str(MODEL), device="cpu", dtype=torch.float32, weight_mode="fused")


@pytest.mark.parametrize("task", niah.TASKS)
def test_prompts_exact_length_needle_at_depth_seeded(embedded, task):
    _, tok = embedded
    builder = niah.NiahBuilder(tok, seed=3)
    for length in (300, 900):
        for depth in (0.0, 0.5, 1.0):
            s = builder.sample(task, length, depth, 0)
            assert len(s.ids) == length
            needle = tok.encode(niah.NEEDLE.format(key=s.key, value=s.answers[0]), add_bos=False)
            assert s.ids[s.needle_token:s.needle_token + len(needle)] == needle
            text = tok.decode(s.ids)
            instruction = niah.INSTRUCTION_ALL if task == "multivalue" else niah.INSTRUCTION
            assert text.startswith(instruction) and text.count(" is: ") == niah.NEEDLES[task]
            assert text.count(f"for {s.key} is:") == (niah.NEEDLES[task] if task == "multivalue" else 1)
            assert all(f"is: {a}." in text for a in s.answers)
            # the asked needle sits at the sentence boundary nearest to the depth (sentences here are < 12 tokens)
            hay_start = len(tok.encode(instruction))
            hay_end = length - len(tok.encode(niah.QUESTION.format(key=s.key) if task != "multivalue" else
                                              niah.QUESTION_ALL.format(key=s.key), add_bos=False))
            others = (niah.NEEDLES[task] - 1) * len(needle) + 4 * (niah.NEEDLES[task] - 1)
            expect = hay_start + depth * (hay_end - hay_start - len(needle))
            assert abs(s.needle_token - expect) <= 12 + others
    again = niah.NiahBuilder(tok, seed=3).sample(task, 900, 0.5, 1)
    assert again == builder.sample(task, 900, 0.5, 1)
    assert niah.NiahBuilder(tok, seed=4).sample(task, 900, 0.5, 1).answers != again.answers


def test_haystack_file_and_errors(embedded, tmp_path):
    _, tok = embedded
    hay = tmp_path / "hay.txt"
    hay.write_text("First sentence here.  Second one!\nThird, and last?")
    assert niah.haystack_sentences(hay) == ["First sentence here.", "Second one!", "Third, and last?"]
    s = niah.NiahBuilder(tok, hay).sample("single", 200, 0.5, 0)
    assert len(s.ids) == 200 and "Second one!" in tok.decode(s.ids)
    with pytest.raises(ValueError, match="too short"):
        niah.NiahBuilder(tok).sample("multivalue", 60, 0.0, 0)
    assert niah.parse_lengths("512, 4k,128K") == [512, 4096, 131072]
    for bad in ("4x", "0", ""):
        with pytest.raises(ValueError):
            niah.parse_lengths(bad)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        niah.parse_depths("0,1.5")


def test_score_on_hand_made_answers():
    assert niah.score("The special magic number is 1234567.", ["1234567"]) == 1.0
    assert niah.score(" 123456 and 2345678", ["1234567"]) == 0.0
    assert niah.score("12345678", ["1234567"]) == 1.0  # RULER's rule is a substring match
    assert niah.score("ABC-7 then 42", ["abc-7", "42", "99", "100"]) == 0.5
    assert niah.score("", ["1"]) == 0.0


def _window_oracle(tok, window: int):
    """Answers from the last ``window`` prompt tokens only: the value of the needle whose key the question asks."""
    def generate(prompts, max_new_tokens):
        out = []
        for ids in prompts:
            text = tok.decode(ids[-window:])
            key = re.findall(r"magic numbers? for (\S+) mentioned", text)[-1]
            out.append(" " + ", ".join(re.findall(rf"numbers for {re.escape(key)} is: (\d+)", text)))
        return out
    return generate


def test_harness_against_known_answer(embedded, tmp_path):
    _, tok = embedded
    depths = [0.0, 0.5, 1.0]
    samples = niah.NiahBuilder(tok).samples(["single", "multikey"], [300, 1200], depths, 2)
    results = niah.run(_window_oracle(tok, 400), samples, batch_size=3)
    expect = {"300": {"0.0": 100.0, "0.5": 100.0, "1.0": 100.0}, "1200": {"0.0": 0.0, "0.5": 0.0, "1.0": 100.0}}
    assert results["grid"] == {"single": expect, "multikey": expect}
    assert results["by_length"] == {"300": 100.0, "1200": pytest.approx(100 / 3)}
    assert len(results["samples"]) == 24 and all(r["prompt_tokens"] == r["length"] for r in results["samples"])
    table = niah.format_table(results)
    assert table.splitlines()[0].split() == ["task", "depth", "300", "1,200"]
    assert "single    0.5    100.0    0.0" in table and table.splitlines()[-1].split() == ["mean", "100.0", "33.3"]
    niah.plot(results, tmp_path / "p" / "niah.png")
    assert (tmp_path / "p" / "niah.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_engine_answers_equal_reference_greedy(embedded):
    model, tok = embedded
    samples = niah.NiahBuilder(tok).samples(["single"], [192], [0.0, 1.0], 1)
    llm = LLM(model, tok, max_slots=2, prefill_chunk_size=64)
    results = niah.run(niah.engine_generate(llm), samples, max_new_tokens=8, batch_size=2)
    for s, r in zip(samples, results["samples"]):
        ref = greedy_reference(model, s.ids, 8, eos_token_id=tok.eos_token_id)[0].tolist()
        assert r["prediction"] == tok.decode(ref) and r["prediction"]


def test_cli_writes_table_json_png(tmp_path):
    out = tmp_path / "res"
    result = CliRunner().invoke(app, ["eval", "niah", "-m", str(MODEL), "--lengths", "160", "--depths", "0,1",
                                      "--samples", "1", "--max-new-tokens", "4", "--out", str(out),
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "niah.json").read_text())
    assert data["config"]["lengths"] == [160] and set(data["grid"]["single"]["160"]) == {"0.0", "1.0"}
    assert (out / "niah.png").stat().st_size > 1000 and "mean accuracy" in result.output
    bad = CliRunner().invoke(app, ["eval", "niah", "-m", str(MODEL), "--tasks", "haystack"])
    assert bad.exit_code != 0 and "unknown NIAH task" in bad.output
