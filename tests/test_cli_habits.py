"""The CLI and Python habits users bring from vLLM and transformers (issue 19, item 6): ``--version``,
``serve MODEL``, ``--dtype`` names (the CLI and ``LLM(dtype=...)``), one-line errors with non-zero exit
codes (a missing local path, a bad preset, ``--device cuda`` without a GPU, a missing optional
dependency), ``bench`` failing when nothing was measured, the top-level exports and logprobs in
``LLM.generate`` results."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import fastxlstm
from fastxlstm.cli import app
from fastxlstm.config import XLSTMConfig
from fastxlstm.devices import parse_dtype
from fastxlstm.engine import LLM
from fastxlstm.extras import EXTRAS, MissingDependency, require
from fastxlstm.tokenizer import Tokenizer

from .helpers import perturbed_model

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
TINY = XLSTMConfig(vocab_size=320, embedding_dim=64, num_blocks=2, num_heads=2)


@pytest.fixture(scope="module")
def tiny_dir(tiny_model_dir):
    return tiny_model_dir


def one_line_error(result, *needles: str) -> str:
    """The failure is one ``error:`` line on stderr (no traceback), containing ``needles``."""
    assert result.exit_code == 1, result.output
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def test_version():
    for flag in ("--version", "-V"):
        result = runner.invoke(app, [flag])
        assert result.exit_code == 0, result.output
        assert result.stdout.strip() == f"fastxlstm {fastxlstm.__version__}"
    assert 'dynamic = ["version"]' in (ROOT / "pyproject.toml").read_text()  # one version, read from __init__


def test_top_level_exports():
    from fastxlstm.engine import GenerationResult, SamplingParams, SequenceState

    assert fastxlstm.SamplingParams is SamplingParams and fastxlstm.SequenceState is SequenceState
    assert fastxlstm.GenerationResult is GenerationResult and fastxlstm.LLM is LLM
    assert {"SamplingParams", "SequenceState", "LLM"} <= set(fastxlstm.__all__)


# ------------------------------------------------------------------------------------------------ dtype
def test_dtype_names_one_parser(tiny_dir):
    assert parse_dtype("auto") is None and parse_dtype(None) is None
    assert parse_dtype("half") is parse_dtype("float16") is parse_dtype("torch.float16") is torch.float16
    assert parse_dtype("bfloat16") is parse_dtype("bf16") is torch.bfloat16
    assert parse_dtype("float32") is parse_dtype("float") is parse_dtype(torch.float32) is torch.float32
    for bad in ("float8", "int8", torch.int64):
        with pytest.raises(ValueError, match="dtype"):
            parse_dtype(bad)
    for name, want in (("half", torch.float16), ("bfloat16", torch.bfloat16), ("auto", torch.float32)):
        assert LLM(str(tiny_dir), device="cpu", dtype=name, max_slots=1).model.dtype == want  # auto: fp32 on CPU
        assert LLM(perturbed_model(TINY), Tokenizer.from_dir(tiny_dir), dtype=name).model.dtype == want
    with pytest.raises(ValueError, match="unknown dtype 'double8'"):
        LLM(str(tiny_dir), dtype="double8")


def test_cli_dtype_option(tiny_dir):
    result = runner.invoke(app, ["generate", "--model", str(tiny_dir), "--prompt", "The quick", "--max-new-tokens",
                                 "3", "--dtype", "bfloat16", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "dtype torch.bfloat16" in result.stderr
    result = runner.invoke(app, ["generate", "--model", str(tiny_dir), "--prompt", "x", "--dtype", "float8"])
    assert result.exit_code == 2 and "unknown dtype 'float8'" in result.output


# ------------------------------------------------------------------------------------------------ errors
def test_missing_local_path_is_not_a_hub_failure(tmp_path, monkeypatch):
    import huggingface_hub

    def no_hub(*a, **k):
        raise AssertionError("the hub was asked for a local path")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    for spec in ("models/typo", "./typo", str(tmp_path / "typo"), "a/b/c"):
        result = runner.invoke(app, ["generate", "--model", spec, "--prompt", "x"])
        one_line_error(result, f"model directory '{spec}' does not exist")
    one_line_error(runner.invoke(app, ["info", "--model", "models/typo"]), "'models/typo' does not exist")


def test_hub_id_failure_says_both(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["generate", "--model", "no-such-org/no-such-model", "--prompt", "x"])
    one_line_error(result, "is not a local directory, and fetching it from the hub failed")


def test_bad_preset_one_line():
    for cmd in (["generate", "--model", "random:nope", "--prompt", "x"],
                ["eval", "perplexity", "--model", "random:nope", "--data", "README.md"],
                ["serve", "random:nope"], ["chat", "random:nope"], ["info", "--model", "random:nope"]):
        one_line_error(runner.invoke(app, cmd, input=""), "unknown preset 'nope'", "xlstm-tiny")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_gpu_one_line():
    for cmd in (["generate", "--model", "random:xlstm-tiny", "--prompt", "x"],
                ["eval", "perplexity", "--model", "random:xlstm-tiny", "--data", "README.md"],
                ["serve", "random:xlstm-tiny"], ["chat", "random:xlstm-tiny"]):
        one_line_error(runner.invoke(app, [*cmd, "--device", "cuda"], input=""), "no CUDA GPU is available")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        LLM("random:xlstm-tiny", device="cuda:0")
    one_line_error(runner.invoke(app, ["generate", "-m", "random:xlstm-tiny", "-p", "x", "--device", "cuda!"]),
                   "invalid device")


# ------------------------------------------------------------------------------------------------ serve
def test_serve_model_positional_or_option(monkeypatch):
    import fastxlstm.checkpoint as ckpt

    seen = []

    def fake_load(model, **kw):
        seen.append((model, kw["dtype"], kw["quantization"]))
        raise ValueError("stop before serving")

    monkeypatch.setattr(ckpt, "load_model_and_tokenizer", fake_load)
    for args in (["serve", "random:xlstm-tiny"], ["serve", "--model", "random:xlstm-tiny"],
                 ["serve", "random:xlstm-tiny", "--model", "random:xlstm-tiny", "--dtype", "half",
                  "--quantization", "int8"]):
        one_line_error(runner.invoke(app, [*args, "--device", "cpu"]), "stop before serving")
    assert seen == [("random:xlstm-tiny", None, None)] * 2 + [("random:xlstm-tiny", torch.float16, "int8")]
    for args, needle in ((["serve"], "no model given"), (["serve", "random:a", "--model", "random:b"], "differ")):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and needle in result.output, result.output


# ----------------------------------------------------------------------------------------- optional deps
def test_extras_match_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    from packaging.requirements import Requirement

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]

    def names(reqs: list[str]) -> set[str]:
        return {Requirement(r).name.lower().replace("-", "_") for r in reqs}

    for extra, modules in EXTRAS.items():
        assert names(extras[extra]) == set(modules), extra
        assert set(modules) <= names(extras["dev"])  # CI installs every extra


def test_missing_optional_dependency_is_a_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # what an install without [serve] looks like
    with pytest.raises(MissingDependency, match=r"needs fastapi: pip install 'fastxlstm\[serve\]'"):
        require("serve", feature="x")
    one_line_error(runner.invoke(app, ["serve", "random:xlstm-tiny"]),
                   "fastxlstm serve needs fastapi: pip install 'fastxlstm[serve]'")
    with pytest.raises(MissingDependency, match=r"fastxlstm\[serve\]"):
        fastxlstm.serving.build_app  # noqa: B018 - the lazy attribute imports the app

    monkeypatch.setitem(sys.modules, "jinja2", None)
    one_line_error(runner.invoke(app, ["chat", "random:xlstm-tiny"], input=""), "jinja2", "fastxlstm[serve]")

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    monkeypatch.delitem(sys.modules, "fastxlstm.eval.lm_eval_backend", raising=False)
    with pytest.raises(MissingDependency, match=r"lm-eval backend fastxlstm needs lm_eval: pip install "
                                                r"'fastxlstm\[eval\]'"):
        importlib.import_module("fastxlstm.eval.lm_eval_backend")

    monkeypatch.setitem(sys.modules, "triton", None)
    for name in [m for m in sys.modules if m.startswith("fastxlstm.ops.triton")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(MissingDependency, match=r"pip install 'fastxlstm\[triton\]'"):
        importlib.import_module("fastxlstm.ops.triton")


# ------------------------------------------------------------------------------------------------ bench
def test_bench_fails_when_no_system_measured(tmp_path, monkeypatch):
    from fastxlstm.bench import driver

    class Proc:
        returncode = 1

    real_run = driver.subprocess.run

    def fake_run(cmd, **kw):  # the worker: writes its part file (a row when it "measured")
        if list(cmd[1:3]) != ["-m", "fastxlstm.bench.worker"]:  # anything else (matplotlib's fc-list on a
            return real_run(cmd, **kw)  # fresh machine: subprocess.run is patched module-wide) runs for real
        system, part = cmd[3], Path(cmd[5])
        rows = [{"batch": 1, "tok_s": 1.0}] if system == "fastxlstm" and measure else []
        part.write_text(json.dumps({"system": system, "decode": rows, "errors": [] if rows else [
            {"what": "load", "error": "RuntimeError: boom"}]}))
        return Proc()

    monkeypatch.setattr(driver.subprocess, "run", fake_run)
    args = ["bench", "--systems", "fastxlstm,llama", "--tiny", "--out-dir", str(tmp_path), "--energy-s", "0"]
    measure = False
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and "no system measured anything" in result.stderr, result.output
    measure = True
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output  # one system measured: the run counts


# ---------------------------------------------------------------------------------------------- logprobs
def test_generate_logprobs_are_the_models_log_softmax(tiny_dir):
    """``LLM.generate(logprobs=k)``: each token's logprob and its top-k alternatives equal the float64
    log-softmax of the model's own logits over prompt + generated tokens (greedy and sampled)."""
    llm = LLM(str(tiny_dir), device="cpu", dtype="float32", max_slots=2)
    prompt = llm.encode("The quick brown fox")
    for kw in (dict(temperature=0.0), dict(temperature=1.0, seed=3)):
        (res,) = llm.generate(prompt, max_new_tokens=8, ignore_eos=True, logprobs=3, **kw)
        assert len(res.logprobs) == len(res.top_logprobs) == len(res.token_ids) == 8
        with torch.no_grad():
            logits, _ = llm.model(torch.tensor([prompt + res.token_ids[:-1]]))
        ref = logits[0, len(prompt) - 1:].double().log_softmax(-1)
        for i, tok in enumerate(res.token_ids):
            assert res.logprobs[i] == pytest.approx(ref[i, tok].item(), abs=1e-4)
            top = ref[i].topk(3)
            assert [t for t, _ in res.top_logprobs[i]] == top.indices.tolist()
            assert [v for _, v in res.top_logprobs[i]] == pytest.approx(top.values.tolist(), abs=1e-4)
    (plain,) = llm.generate(prompt, max_new_tokens=4)
    assert plain.logprobs is None and plain.top_logprobs is None
