"""CLI: generate (streaming and not) and info on a saved model directory."""

from __future__ import annotations

import shutil

from typer.testing import CliRunner

from fastxlstm.cli import app
from fastxlstm.config import XLSTMConfig
from fastxlstm.tokenizer import Tokenizer

from .helpers import greedy_reference as generate
from .helpers import perturbed_model

runner = CliRunner()


def make_model_dir(tmp_path, tokenizer_dir):
    model = perturbed_model(XLSTMConfig(vocab_size=320, embedding_dim=64, num_blocks=2, num_heads=2))
    model.save_pretrained(str(tmp_path / "m"))
    shutil.copy(tokenizer_dir / "tokenizer.json", tmp_path / "m" / "tokenizer.json")
    return model, tmp_path / "m"


def test_generate_greedy_matches_library(tmp_path, tiny_tokenizer_dir):
    model, path = make_model_dir(tmp_path, tiny_tokenizer_dir)
    tok = Tokenizer.from_dir(path)
    prompt = "The quick brown fox"
    ids = generate(model, tok.encode(prompt), max_new_tokens=12, eos_token_id=tok.eos_token_id)[0].tolist()
    if tok.eos_token_id in ids:
        ids = ids[: ids.index(tok.eos_token_id)]
    expected = prompt + tok.decode(ids)
    for flag in ("--stream", "--no-stream"):
        result = runner.invoke(app, ["generate", "--model", str(path), "--prompt", prompt,
                                     "--max-new-tokens", "12", flag])
        assert result.exit_code == 0, result.output
        assert result.stdout.splitlines()[0] == expected.splitlines()[0]


def test_info_prints_config_and_params(tmp_path, tiny_tokenizer_dir):
    _, path = make_model_dir(tmp_path, tiny_tokenizer_dir)
    result = runner.invoke(app, ["info", "--model", str(path)])
    assert result.exit_code == 0, result.output
    assert "embedding_dim" in result.stdout and "parameters" in result.stdout
    result = runner.invoke(app, ["info", "--model", "random:xlstm-7b"])
    assert "6.87 B" in result.stdout


def test_random_preset_generates_and_warns():
    result = runner.invoke(app, ["generate", "--model", "random:xlstm-tiny", "--prompt", "Hi", "--max-new-tokens", "5"])
    assert result.exit_code == 0, result.output
    assert "randomly initialised" in result.stderr


def test_bad_model_path_fails_cleanly(tmp_path):
    result = runner.invoke(app, ["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"])
    assert result.exit_code == 1
    assert "does not exist" in result.stderr and "Traceback" not in result.output
