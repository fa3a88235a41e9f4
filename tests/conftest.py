"""Shared fixtures; GPU-marked tests skip on machines without CUDA."""

from __future__ import annotations

import importlib.util

import pytest
import torch

# The serving tests need the server's extras (fastapi, openai); the GPU image has neither, so
# `pytest -m gpu tests/` there must not fail on collecting them.
collect_ignore_glob = (
    ["test_serving_*.py"]
    if any(importlib.util.find_spec(m) is None for m in ("fastapi", "openai", "uvicorn"))
    else []
)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seeded_gpu_tests(request):
    """GPU tests start from the same global RNG state whatever ran before them (and whichever subset
    runs): their tolerances were set from measured errors of these inputs, not of any inputs."""
    if request.node.get_closest_marker("gpu") is not None:
        torch.manual_seed(0)  # seeds CUDA's generators too
    yield


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """A real byte-level BPE tokenizer.json trained on a few sentences (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|padding|>", "<|eos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    text = ["The quick brown fox jumps over the lazy dog.", "Ein Bär läuft über die Brücke — schön!",
            "xLSTM is a recurrent language model with matrix memory.", "日本語のテキストも少し。"] * 20
    tok.train_from_iterator(text, trainer)
    out = tmp_path_factory.mktemp("tok")
    tok.save(str(out / "tokenizer.json"))
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_dir):
    """A small perturbed-random model (vocab 320, width 64, 2 blocks) saved with the test tokenizer."""
    import shutil

    from fastxlstm.config import XLSTMConfig

    from .helpers import perturbed_model

    path = tmp_path_factory.mktemp("tiny-model") / "m"
    perturbed_model(XLSTMConfig(vocab_size=320, embedding_dim=64, num_blocks=2, num_heads=2)).save_pretrained(path)
    shutil.copy(tiny_tokenizer_dir / "tokenizer.json", path / "tokenizer.json")
    return path
