"""Train a byte-level BPE tokenizer (``tokenizers`` library) for small custom models."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from .data import iter_documents

# Same special tokens and ids as fastxlstm.tokenizer's byte-level tokenizer and XLSTMConfig's
# defaults: bos 0, pad 1, eos 2.
SPECIAL_TOKENS = ("<|endoftext|>", "<|padding|>", "<|eos|>")


def train_bpe(
    inputs: Iterable[str | os.PathLike], out_dir: str | os.PathLike, vocab_size: int = 8192,
    min_frequency: int = 2, text_key: str = "text", progress: bool = True,
) -> Path:
    """Train on text/JSONL files or directories; writes ``tokenizer.json`` (+ config files) to ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} for a byte-level BPE")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=progress,
    )
    tok.train_from_iterator(iter_documents(inputs, text_key), trainer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    bos, pad, eos = SPECIAL_TOKENS
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos, "pad_token": pad,
        "unk_token": None, "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000,
    }, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": bos, "eos_token": eos, "pad_token": pad}, indent=2) + "\n")
    return out
