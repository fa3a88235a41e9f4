"""``fastxlstm data prepare|tokenizer`` and ``fastxlstm train`` (typer sub-commands)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

data_app = typer.Typer(help="Prepare training data: tokenizers and token shards.", no_args_is_help=True)


@data_app.command("prepare")
def prepare_cmd(
    tokenizer: Annotated[Path, typer.Option("--tokenizer", "-t", help="tokenizer.json or a directory holding one")],
    inputs: Annotated[list[Path], typer.Option("--input", "-i", help="Text/JSONL file or directory (repeatable)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory for meta.json and shards")],
    val_fraction: Annotated[float, typer.Option(min=0.0, max=0.99, help="Share of documents held out")] = 0.01,
    text_key: Annotated[str, typer.Option(help="Field holding the text in JSONL records")] = "text",
    val_inputs: Annotated[
        list[Path] | None, typer.Option("--val-input", help="Held-out files/dirs (replaces --val-fraction)")
    ] = None,
    shard_tokens: Annotated[int, typer.Option(min=1, help="Tokens per shard file")] = 100_000_000,
    fmt: Annotated[str, typer.Option("--format", help="text (pretraining), or chat / instruct JSONL for fine-tuning "
                                     "with a loss mask on the assistant / completion tokens")] = "text",
    chat_template: Annotated[
        Path | None, typer.Option(help="Directory whose chat template to use (default: the tokenizer's)")
    ] = None,
) -> None:
    """Tokenise text (or chat/instruct records) into memory-mapped token shards with a held-out split."""
    from .chat_data import prepare_chat
    from .data import prepare

    if fmt not in ("text", "chat", "instruct"):
        raise typer.BadParameter(f"--format must be text, chat or instruct, got {fmt!r}")
    try:
        if fmt == "text":
            meta = prepare(tokenizer, inputs, out, val_fraction=val_fraction, text_key=text_key,
                           shard_tokens=shard_tokens, val_inputs=val_inputs)
        else:
            meta = prepare_chat(tokenizer, inputs, out, fmt, val_fraction=val_fraction, shard_tokens=shard_tokens,
                                val_inputs=val_inputs, template_dir=chat_template)
    except (FileNotFoundError, ValueError) as e:
        raise typer.BadParameter(str(e)) from e
    s = meta["splits"]
    typer.echo(f"{out}: {meta['dtype']} tokens, vocab {meta['vocab_size']}; train {s['train']['tokens']:,} tokens "
               f"({s['train']['documents']} docs), val {s['val']['tokens']:,} tokens ({s['val']['documents']} docs)")


@data_app.command("tokenizer")
def tokenizer_cmd(
    train: Annotated[list[Path], typer.Option("--train", help="Text/JSONL file or directory to train on (repeatable)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory for tokenizer.json")],
    vocab_size: Annotated[int, typer.Option(min=259)] = 8192,
    min_frequency: Annotated[int, typer.Option(min=1)] = 2,
    text_key: str = "text",
) -> None:
    """Train a byte-level BPE tokenizer (tokenizers library) for small custom models."""
    from .tokenizer_train import train_bpe

    try:
        path = train_bpe(train, out, vocab_size=vocab_size, min_frequency=min_frequency, text_key=text_key)
    except (FileNotFoundError, ValueError) as e:
        raise typer.BadParameter(str(e)) from e
    typer.echo(f"wrote {path / 'tokenizer.json'}")


def train_cmd(
    config: Annotated[Path, typer.Argument(help="YAML training config (see configs/)")],
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="section.key=value override (repeatable)")
    ] = None,
) -> None:
    """Pretrain or fine-tune (model.init_from) from CONFIG; under torchrun for several processes."""
    from .config import TrainConfig
    from .trainer import run

    try:
        cfg = TrainConfig.load(config, overrides or [])
    except (FileNotFoundError, ValueError) as e:
        raise typer.BadParameter(str(e)) from e
    summary = run(cfg)
    typer.echo(json.dumps(summary, indent=2))
