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
    temperature: Annotated[float, typer.Option(min=0.0, help="0: greedy")] = 0.0,
    top_k: Annotated[int, typer.Option(min=0)] = 0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    min_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.0,
    repetition_penalty: Annotated[float, typer.Option(min=0.0)] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Reproducible sampling (same tokens as LLM.generate / the "
                                                  "server with this seed)")] = None,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Do not stop at the EOS token")] = False,
    stream: Annotated[bool, typer.Option("--stream/--no-stream")] = True,
    device: str | None = None,
    dtype: str | None = None,
    speculative_config: Annotated[str | None, typer.Option(
        "--speculative-config", help='Speculative decoding as JSON (vLLM\'s names), e.g. \'{"method": "ngram", '
        '"num_speculative_tokens": 4}\' or \'{"method": "draft", "num_speculative_tokens": 3, "model": DIR}\'; '
        'the output is that of plain decoding')] = None,
) -> None:
    """Generate a continuation of PROMPT on the engine (greedy when --temperature 0)."""
    from .engine import LLM
    from .sampling import SamplingParams

    try:
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                min_p=min_p, repetition_penalty=repetition_penalty, seed=seed, ignore_eos=ignore_eos)
    except ValueError as e:
        fail(str(e))
    t0 = time.perf_counter()
    try:
        llm = LLM(model, device=device, dtype=_dtype(dtype), max_slots=1, speculative_config=speculative_config)
    except (FileNotFoundError, NotADirectoryError, ValueError, KeyError) as e:
        fail(str(e))
    except (RuntimeError, AssertionError) as e:  # e.g. --device cuda on a machine without one
        fail(f"could not load {model} on device {device or 'auto'}: {e}")
    if model.startswith("random:"):
        console.print(f"[yellow]note:[/] {model} is a randomly initialised model: its text is noise.")
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
                  f"device {llm.model.device}, dtype {llm.model.dtype}[/]")
    if llm.speculative_config is not None:
        console.print(f"[dim]speculative: {result.num_spec_steps} steps, {result.num_accepted_tokens} of "
                      f"{result.num_draft_tokens} drafted tokens accepted[/]")


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
