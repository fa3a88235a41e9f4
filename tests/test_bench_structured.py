"""``benchmarks/structured_gpu.py`` runs offline: its ``--tiny`` CPU dry run (random weights, the tokenizer shipped
in the repository) serves both variants through the real server and client, every answer runs to the token
limit, the constrained ones are JSON under the schema, and the JSON file and table are written."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("xgrammar")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "structured_gpu.py"


def bench():
    spec = importlib.util.spec_from_file_location("structured_gpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tiny_dry_run_writes_both_variants(tmp_path, capsys):
    out = tmp_path / "structured.json"
    result = bench().main(["--tiny", "--batch", "2", "--max-tokens", "8", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["vocab"] == 8192 and result["model"] == "random:xlstm-tiny" and result["batch"] == 2
    rounds = result["rounds"]
    assert [r["constrained"] for r in rounds] == [False, True]
    assert all(r["all_at_limit"] and r["completion_tokens"] == 16 for r in rounds)
    assert rounds[1]["all_json"] and rounds[1]["sample"].startswith('[{"')
    assert not rounds[0]["sample"].startswith('[{"')  # the unconstrained random model writes no JSON
    assert result["ratio"] == pytest.approx(rounds[1]["tokens_per_s"] / rounds[0]["tokens_per_s"])
    printed = capsys.readouterr().out
    assert "json_schema" in printed and "unconstrained" in printed and "ratio" in printed
