"""``--quantization`` wired through ``fastxlstm generate``, ``eval perplexity``, ``serve``, ``bench`` and the
lm-eval backend's ``model_args`` (one option, one parser): on the CPU both schemes run (dequantized math),
and the results are those of the library's quantized model."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import fastxlstm
from fastxlstm.cli import app
from fastxlstm.config import XLSTMConfig
from fastxlstm.engine import LLM, Runner
from fastxlstm.eval.perplexity import load_documents, perplexity, prefix_token
from fastxlstm.model.quant import model_quantization
from fastxlstm.ops.quant import parse_quantization
from fastxlstm.tokenizer import Tokenizer

runner = CliRunner()
CFG = XLSTMConfig(vocab_size=320, embedding_dim=64, num_blocks=2, num_heads=2)
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def tiny_dir(tiny_model_dir):
    return tiny_model_dir


def test_one_parser():
    assert parse_quantization(None) is parse_quantization("none") is parse_quantization("") is None
    assert parse_quantization("INT8") == "int8" and parse_quantization("fp8") == "fp8"
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        parse_quantization("int4")
    for cmd in (["generate", "-m", "random:xlstm-tiny", "-p", "x"], ["serve", "random:xlstm-tiny"],
                ["eval", "perplexity", "-m", "random:xlstm-tiny", "--data", "README.md"],
                ["chat", "random:xlstm-tiny"]):
        result = runner.invoke(app, [*cmd, "--quantization", "int4"], input="")
        assert result.exit_code == 2 and "unknown quantization 'int4'" in result.output, (cmd, result.output)
    result = runner.invoke(app, ["bench", "--tiny", "--quantization", "bf16,int4"])
    assert result.exit_code == 2 and "unknown quantization 'int4'" in result.output, result.output


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_generate_quantized_equals_llm(tiny_dir, scheme):
    llm = LLM(str(tiny_dir), device="cpu", quantization=scheme, max_slots=1)
    assert model_quantization(llm.model) == (scheme, False)
    want = llm.generate(PROMPT, max_new_tokens=10, ignore_eos=True)[0]
    for flag in ("--stream", "--no-stream"):
        result = runner.invoke(app, ["generate", "--model", str(tiny_dir), "--prompt", PROMPT, "--max-new-tokens",
                                     "10", "--ignore-eos", "--quantization", scheme, "--device", "cpu", flag])
        assert result.exit_code == 0, result.output
        assert result.stdout == PROMPT + want.text + "\n"
        assert f"quantization {scheme}" in result.stderr


def test_eval_perplexity_quantized(tiny_dir, tmp_path):
    data = tmp_path / "docs.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 8)
    got = {}
    for scheme in ("none", "int8", "fp8"):
        out = tmp_path / f"{scheme}.json"
        result = runner.invoke(app, ["eval", "perplexity", "--model", str(tiny_dir), "--data", str(data), "--json",
                                     str(out), "--quantization", scheme, "--device", "cpu"])
        assert result.exit_code == 0, result.output
        got[scheme] = json.loads(out.read_text())
        assert got[scheme]["quantization"] == (None if scheme == "none" else scheme)
    for scheme in ("int8", "fp8"):
        model = fastxlstm.load(tiny_dir, weight_mode="fused", quantization=scheme)
        tok = Tokenizer.from_dir(tiny_dir)
        ref = perplexity(Runner(model), load_documents([data], tok), prefix_token(tok))
        assert got[scheme]["nll"] == pytest.approx(ref.nll, rel=1e-6)
        assert got[scheme]["nll"] != got["none"]["nll"]  # the weights were quantized
        assert got[scheme]["perplexity"] == pytest.approx(got["none"]["perplexity"], rel=0.05)


def test_lm_eval_model_args_quantization(tiny_dir):
    pytest.importorskip("lm_eval")
    from fastxlstm.eval.lm_eval_backend import FastXLSTMLM

    for scheme in ("int8", "fp8"):
        lm = FastXLSTMLM(pretrained=str(tiny_dir), device="cpu", quantization=scheme)
        assert model_quantization(lm.llm.model) == (scheme, False)
    assert model_quantization(FastXLSTMLM(pretrained=str(tiny_dir), quantization="none").llm.model) is None
