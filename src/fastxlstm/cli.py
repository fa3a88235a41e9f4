"""Command line: ``fastxlstm generate|chat|info|serve|bench|data|train|eval`` and ``fastxlstm --version``."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .bench.cli import bench as bench_cmd
from .eval.cli import eval_app
from .options import (
    DeviceOpt,
    DtypeOpt,
    ModelArg,
    ModelOpt,
    ModelOrArgOpt,
    QuantizationOpt,
    SpeculativeOpt,
    console,
    fail,
    pick_model,
)
from .serving.cli import serve as serve_cmd
from .training.cli import data_app, train_cmd

app = typer.Typer(help="fastxlstm: fast xLSTM inference, serving and training.", no_args_is_help=True,
                  pretty_exceptions_show_locals=False)
def load_llm(model: str, device: str | None, dtype, quantization: str | None, **kwargs):
    """``LLM(model, ...)`` for a command: user errors (a missing directory, a bad preset, ``--device cuda``
    without a GPU, an unsupported quantization) as one line and exit status 1."""
    from .engine import LLM

    try:
        llm = LLM(model, device=device, dtype=dtype, quantization=quantization, **kwargs)
    except (FileNotFoundError, NotADirectoryError, ValueError, KeyError) as e:
        fail(e)
    except (RuntimeError, AssertionError) as e:  # a device that fails on first use
        fail(f"could not load {model} on device {device or 'auto'}: {e}")
    if model.startswith("random:"):
        console.print(f"[yellow]note:[/] {model} is a randomly initialised model: its text is noise.")
    return llm


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fastxlstm {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", "-V", callback=_version, is_eager=True,
                                                help="Print the version and exit")] = False) -> None:
    """fastxlstm: fast xLSTM inference, serving and training."""


@app.command()
def generate(
    model: ModelOpt,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Prompt text")],
    max_new_tokens: Annotated[int, typer.Option(min=0)] = 64,
    temperature: Annotated[float, typer.Option(min=0.0, help="0: greedy")] = 0.0,
    top_k: Annotated[int, typer.Option(min=0)] = 0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    min_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.0,
    repetition_penalty: Annotated[float, typer.Option(min=0.0)] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Reproducible sampling (same tokens as LLM.generate / the "
                                                  "server with this seed)")] = None,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Do not stop at the EOS token")] = False,
    stream: Annotated[bool, typer.Option("--stream/--no-stream")] = True,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    quantization: QuantizationOpt = None,
    speculative_config: SpeculativeOpt = None,
) -> None:
    """Generate a continuation of PROMPT on the engine (greedy when --temperature 0)."""
    from .sampling import SamplingParams

    try:
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                min_p=min_p, repetition_penalty=repetition_penalty, seed=seed, ignore_eos=ignore_eos)
    except ValueError as e:
        fail(str(e))
    t0 = time.perf_counter()
    llm = load_llm(model, device, dtype, quantization, max_slots=1, speculative_config=speculative_config)
    if not llm.tokenizer.encode(prompt):
        raise typer.BadParameter("the prompt encodes to no tokens", param_hint="--prompt")
    load_s = time.perf_counter() - t0
    out = sys.stdout
    out.write(prompt)
    out.flush()
    t1 = time.perf_counter()
    if stream:
        pieces = llm.stream(prompt, params)
        while True:
            try:
                out.write(next(pieces))
                out.flush()
            except StopIteration as done:
                result = done.value
                break
    else:
        result = llm.generate(prompt, sampling_params=params)[0]
        out.write(result.text)
    out.write("\n")
    dt = time.perf_counter() - t1
    n = len(result.token_ids)
    console.print(f"[dim]{n} tokens in {dt:.2f}s ({n / max(dt, 1e-9):.1f} tok/s), load {load_s:.2f}s, "
                  f"device {llm.model.device}, dtype {llm.model.dtype}, quantization {_quantization(llm.model)}[/]")
    if llm.speculative_config is not None:
        console.print(f"[dim]speculative: {result.num_spec_steps} steps, {result.num_accepted_tokens} of "
                      f"{result.num_draft_tokens} drafted tokens accepted[/]")


def _quantization(model) -> str:
    from .model.quant import model_quantization

    return (model_quantization(model) or ("none",))[0]


@app.command()
def chat(
    model_arg: ModelArg = None,
    model: ModelOrArgOpt = None,
    system: Annotated[str | None, typer.Option(help="System prompt (first message of every conversation)")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens per reply at most")] = 256,
    temperature: Annotated[float, typer.Option(min=0.0, help="0: greedy")] = 0.7,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.95,
    seed: int | None = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string (repeatable)")] = None,
    chat_template: Annotated[Path | None, typer.Option(help="Jinja chat template file (overrides the model's)")]
    = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    quantization: QuantizationOpt = None,
) -> None:
    """Chat with MODEL in the terminal: replies stream as they are generated, each turn continues the
    recurrent state of the previous one (no re-prefill of the history); /reset starts over, /exit quits.
    The chat template is the one fastxlstm serve uses."""
    from .chat import ChatSession, repl
    from .extras import MissingDependency, require
    from .sampling import SamplingParams

    model = pick_model(model_arg, model, "chat")
    try:
        require("serve", ("jinja2",), feature="fastxlstm chat (the chat template)")
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                stop=stop or [])
    except (MissingDependency, ValueError) as e:
        fail(e)
    from .serving.chat_template import ChatTemplate

    llm = load_llm(model, device, dtype, quantization, max_slots=1)
    try:
        template = ChatTemplate.from_model_dir(getattr(llm.model, "source_dir", None))
        if chat_template is not None:
            template = ChatTemplate(chat_template.read_text(), template.special_tokens, str(chat_template))
        session = ChatSession(llm, template, params, system)
    except (OSError, ValueError) as e:
        fail(e)
    interactive = sys.stdin.isatty()
    if interactive:
        console.print(f"[dim]chat with {model} (template: {template.origin}); /reset starts over, /exit quits[/]")
    repl(session, sys.stdin, sys.stdout, prompt="> " if interactive else "")


@app.command()
def info(model: ModelOpt) -> None:
    """Print a model's config and parameter count."""
    from .checkpoint import CONFIG_NAME, resolve_model_dir
    from .config import XLSTMConfig, preset

    try:
        if model.startswith("random:"):
            cfg = preset(model.split(":", 1)[1])
        else:
            cfg = XLSTMConfig.from_json(resolve_model_dir(model) / CONFIG_NAME)
    except (FileNotFoundError, NotADirectoryError, ValueError, KeyError) as e:
        fail(e)
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
