"""SequenceState files: a state from the engine round-trips and validates; hostile or damaged files
(wrong layers, shapes, dtypes, NaN/inf, token ids out of the vocabulary, lying metadata, truncation)
are refused by load(config=...) and validate() with an error naming the file and the part."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastxlstm.config import XLSTMConfig
from fastxlstm.engine import LLM, SequenceState
from fastxlstm.engine.state import StateError
from fastxlstm.tokenizer import Tokenizer

from .helpers import perturbed_model

CFG = XLSTMConfig(vocab_size=259, embedding_dim=64, num_blocks=2, num_heads=2, weight_mode="fused", chunk_size=16)


@pytest.fixture(scope="module")
def llm():
    return LLM(perturbed_model(CFG), Tokenizer.byte_level(), max_slots=2)


@pytest.fixture(scope="module")
def prefilled(llm, tmp_path_factory):
    path = tmp_path_factory.mktemp("st") / "s.safetensors"
    llm.prefill([5, 6, 7, 8, 9]).save(path)
    return path


def test_engine_state_round_trips_and_validates(llm, prefilled, tmp_path):
    state = SequenceState.load(prefilled, config=CFG)
    assert state.validate(CFG, vocab_size=CFG.vocab_size) is state
    cont = llm.generate(state, max_new_tokens=5, temperature=0.0)[0].token_ids
    assert cont == llm.generate([5, 6, 7, 8, 9], max_new_tokens=5, temperature=0.0)[0].token_ids
    pending = llm.generate([5, 6, 7], max_new_tokens=3, temperature=0.0, return_state=True)[0].state
    pending.save(tmp_path / "p.safetensors")
    again = SequenceState.load(tmp_path / "p.safetensors", config=CFG)  # a pending-token state validates too
    assert again.pending_token == pending.pending_token is not None


def _rewrite(path, out, tensors=None, **meta):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        old = fh.metadata()
    data = load_file(str(path))
    if tensors is not None:
        data = tensors(data)
    save_file(data, str(out), metadata={**old, **{k: str(v) for k, v in meta.items()}})
    return out


def _bad(data, key, value):
    data[key] = value
    return data


CASES = {
    "fewer_layers": (dict(num_layers=1), None, "the state has 1 layers, the model 2"),
    "more_layers_than_tensors": (dict(num_layers=10**9), None, "num_layers"),
    "num_layers_not_int": (dict(num_layers="two"), None, "not a readable sequence state"),
    "missing_tensor": (None, lambda d: {k: v for k, v in d.items() if k != "layers.1.n"}, "missing 'layers.1.n'"),
    "c_shape": (None, lambda d: _bad(d, "layers.0.C", torch.zeros(1, 2, 16, 33)), r"layers\.0\.C is \(1, 2, 16, 33\)"),
    "n_batch2": (None, lambda d: _bad(d, "layers.1.n", torch.zeros(2, 2, 16)), r"layers\.1\.n is \(2, 2, 16\)"),
    "c_float64": (None, lambda d: _bad(d, "layers.0.C", d["layers.0.C"].double()), "float64"),
    "m_int": (None, lambda d: _bad(d, "layers.0.m", d["layers.0.m"].long()), "int64"),
    "c_nan": (None, lambda d: _bad(d, "layers.1.C", d["layers.1.C"].index_fill(3, torch.tensor([0]), float("nan"))),
              r"layers\.1\.C holds NaN or inf"),
    "m_inf": (None, lambda d: _bad(d, "layers.0.m", torch.full((1, 2), float("inf"))), r"layers\.0\.m holds NaN"),
    "token_too_big": (dict(token_ids=json.dumps([5, 259])), None, r"token id 259 is not an integer in \[0, 259\)"),
    "token_negative": (dict(token_ids=json.dumps([-1])), None, "token id -1"),
    "token_float": (dict(token_ids=json.dumps([5.5])), None, "token id 5.5"),
    "token_bool": (dict(token_ids=json.dumps([True])), None, "token id True"),
    "token_ids_not_list": (dict(token_ids=json.dumps({"a": 1})), None, "token_ids is not a list"),
    "token_ids_garbage": (dict(token_ids="[1, 2"), None, "not a readable sequence state"),
    "logits_shape": (None, lambda d: _bad(d, "logits", torch.zeros(300)), r"logits are \(300,\)"),
    "logits_nan": (None, lambda d: _bad(d, "logits", torch.full((259,), float("nan"))), "logits hold NaN"),
    "rng_negative": (dict(rng_counter=-3), None, "rng_counter must be an integer >= 0"),
    "both_logits_and_pending": (dict(pending_token=7), None, "exactly one of logits and pending_token"),
    "format": (dict(format="something-else"), None, "not a fastxlstm sequence state"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_state_files_are_refused_with_the_file_named(prefilled, tmp_path, case):
    meta, tensors, message = CASES[case]
    path = _rewrite(prefilled, tmp_path / "bad.safetensors", tensors, **(meta or {}))
    with pytest.raises(StateError, match=message) as err:
        SequenceState.load(path, config=CFG)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("cut", [0, 5, 100, -10])
def test_truncated_state_file_is_named(prefilled, tmp_path, cut):
    data = prefilled.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:cut] if cut >= 0 else data[:cut])
    with pytest.raises(StateError, match="cut.safetensors is not a readable sequence state"):
        SequenceState.load(tmp_path / "cut.safetensors")


def test_validate_checks_a_smaller_vocabulary_and_other_models(prefilled):
    state = SequenceState.load(prefilled)
    with pytest.raises(StateError, match=r"token id 8 is not an integer in \[0, 8\)"):
        state.validate(CFG.replace(vocab_size=8))
    with pytest.raises(StateError, match=r"logits are \(259,\)"):
        state.validate(CFG, vocab_size=300)
    with pytest.raises(StateError, match="3 layers|the model 3"):
        state.validate(CFG.replace(num_blocks=3))
    with pytest.raises(StateError, match=r"layers\.0\.C is \(1, 2, 16, 32\)"):
        state.validate(CFG.replace(num_heads=4))
    bf16 = SequenceState([(c.bfloat16(), n, m) for c, n, m in state.layers], state.token_ids, state.logits)
    assert bf16.validate(CFG) is bf16  # the engine's bfloat16 state dtype
