"""The command-line options several commands share, defined once: ``--model``, ``--device``, ``--dtype`` and
``--quantization`` (``generate``, ``chat``, ``serve``, ``eval perplexity``; ``bench --quantization`` takes a list
of the same names), ``--speculative-config`` (``generate``, ``serve``), and the stderr console and one-line
errors (:func:`fail`) every command uses. The sub-command modules import these from here, not from
:mod:`fastxlstm.cli` (which imports them). Values are
parsed by the library's own parsers (:func:`fastxlstm.devices.parse_dtype`,
:func:`fastxlstm.ops.quant.parse_quantization`), which ``LLM(...)`` and lm-eval's ``model_args`` use too."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from .devices import DTYPE_CHOICES, parse_dtype
from .ops.quant import SCHEMES, parse_quantization

MODEL_HELP = "Model directory, hub repo id, or random:<preset>"

console = Console(stderr=True, soft_wrap=True)


def fail(message: str | BaseException) -> None:
    """Print a one-line error and exit with status 1 (no traceback for user errors)."""
    if isinstance(message, KeyError) and len(message.args) == 1:  # str(KeyError) quotes its message
        message = message.args[0]
    console.print(f"[red]error:[/] {escape(str(message))}", highlight=False)
    raise typer.Exit(1)


def _parsed(parse):
    def callback(value):
        try:
            return parse(value)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None

    return callback


ModelOpt = Annotated[str, typer.Option("--model", "-m", help=MODEL_HELP)]
DeviceOpt = Annotated[str | None, typer.Option(help="cuda, cuda:N or cpu (default: cuda when available)")]
DtypeOpt = Annotated[str | None, typer.Option(
    help=f"Weights' dtype: {', '.join(DTYPE_CHOICES)} (auto: bfloat16 on CUDA, float32 on the CPU)",
    callback=_parsed(parse_dtype))]
QuantizationOpt = Annotated[str | None, typer.Option(
    help=f"Quantize the blocks' weights at load: {', '.join(SCHEMES)} or none (a directory saved quantized "
         "loads as saved)", callback=_parsed(parse_quantization))]

SpeculativeOpt = Annotated[str | None, typer.Option(
    "--speculative-config", help='Speculative decoding as JSON (vLLM\'s names), e.g. \'{"method": "ngram", '
    '"num_speculative_tokens": 4}\' or \'{"method": "draft", "num_speculative_tokens": 3, "model": DIR}\'; '
    'the output is that of plain decoding')]

ModelArg = Annotated[str | None, typer.Argument(metavar="MODEL", help=f"{MODEL_HELP} (or --model)", show_default=False)]
ModelOrArgOpt = Annotated[str | None, typer.Option("--model", "-m", help=f"{MODEL_HELP} (or as the first argument)")]


def pick_model(positional: str | None, option: str | None, command: str) -> str:
    """The model of ``fastxlstm COMMAND MODEL`` (vLLM's habit) or ``--model MODEL``."""
    if positional and option and positional != option:
        raise typer.BadParameter(f"MODEL {positional!r} and --model {option!r} differ; give one")
    if not (positional or option):
        raise typer.BadParameter(f"no model given: fastxlstm {command} MODEL (or --model MODEL)")
    return positional or option
