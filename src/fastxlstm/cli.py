"""Command line: ``fastxlstm generate|info|serve|bench|data|train|eval``."""

from __future__ import annotations

import sys
import time
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.table import Table

from .bench.cli import bench as bench_cmd
from .eval.cli import eval_app
from .serving.cli import serve as serve_cmd
from .training.cli import data_app, train_cmd

app = typer.Typer(help="fastxlstm: fast xLSTM inference, serving and training.", no_args_is_help=True,
                  pretty_exceptions_show_locals=False)
console = Console(stderr=True, soft_wrap=True)

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Model directory, hub repo id, or random:<preset>")]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def fail(message: str) -> None:
    """Print a one-line error and exit with status 1 (no traceback for user errors)."""
    console.print(f"[red]error:[/] {message}")
    raise typer.Exit(1)


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise typer.BadParameter(f"dtype must be one of {', '.join(DTYPES)}")
    return DTYPES[name]


@app.command()
def generate(
    model: ModelOpt,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Prompt text")],
    max_new_tokens: Annotated[int, typer.Option(min=0)] = 64,
    temperature: Annotated[float, typer.Option(min=0.0)] = 0.0,
    top_k: Annotated[int, typer.Option(min=0)] = 0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    seed: int | None = None,
    stream: Annotated[bool, typer.Option("--stream/--no-stream")] = True,
    device: str | None = None,
    dtype: str | None = None,
) -> None:
    """Generate a continuation of PROMPT (greedy when --temperature 0)."""
    from .checkpoint import load_model_and_tokenizer
    from .generation import generate_stream

    t0 = time.perf_counter()
    try:
        net, tok = load_model_and_tokenizer(model, device=device, dtype=_dtype(dtype))
    except (FileNotFoundError, NotADirectoryError, ValueError, KeyError) as e:
        fail(str(e))
    if model.startswith("random:"):
        console.print(f"[yellow]note:[/] {model} is a randomly initialised model: its text is noise.")
    ids = tok.encode(prompt)
    if not ids:
        raise typer.BadParameter("the prompt encodes to no tokens", param_hint="--prompt")
    load_s = time.perf_counter() - t0
    decoder = tok.incremental_decoder()
    out = sys.stdout
    out.write(prompt)
    out.flush()
    t1 = time.perf_counter()
    pieces, n = [], 0
    for token in generate_stream(net, ids, max_new_tokens, temperature, top_k, top_p, seed, tok.eos_token_id):
        n += 1
        if int(token[0]) == tok.eos_token_id:
            break
        piece = decoder.add(int(token[0]))
        if stream:
            out.write(piece)
            out.flush()
        else:
            pieces.append(piece)
    tail = decoder.flush()
    out.write(("" if stream else "".join(pieces)) + tail + "\n")
    dt = time.perf_counter() - t1
    console.print(f"[dim]{n} tokens in {dt:.2f}s ({n / max(dt, 1e-9):.1f} tok/s), load {load_s:.2f}s, "
                  f"device {net.device}, dtype {net.dtype}[/]")


@app.command()
def info(model: ModelOpt) -> None:
    """Print a model's config and parameter count."""
    from .checkpoint import CONFIG_NAME, resolve_model_dir
    from .config import XLSTMConfig, preset

    if model.startswith("random:"):
        cfg = preset(model.split(":", 1)[1])
        n_params = cfg.num_parameters()
    else:
        cfg = XLSTMConfig.from_json(resolve_model_dir(model) / CONFIG_NAME)
        n_params = cfg.num_parameters()
    table = Table(title=f"xLSTM model {model}")
    table.add_column("field")
    table.add_column("value")
    for key, value in cfg.to_dict().items():
        if key not in ("architectures",):
            table.add_row(key, str(value))
    table.add_row("qk_head_dim / v_head_dim", f"{cfg.qk_head_dim} / {cfg.v_head_dim}")
    table.add_row("ffn_dim", str(cfg.ffn_dim))
    table.add_row("parameters", f"{n_params:,} ({n_params / 1e9:.2f} B)")
    Console().print(table)


# Sub-commands owned by other areas (their modules import only typer at load time).
app.add_typer(data_app, name="data")
app.add_typer(eval_app, name="eval")
app.command("train")(train_cmd)
app.command("serve")(serve_cmd)
app.command("bench")(bench_cmd)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
