"""``fastxlstm eval perplexity|niah`` (typer sub-app; heavy imports happen inside the commands)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ..options import DeviceOpt, DtypeOpt, ModelOpt, QuantizationOpt

eval_app = typer.Typer(help="Evaluate a model on the engine: perplexity, long-context retrieval (NIAH). "
                            "For lm-evaluation-harness tasks: python -m fastxlstm.eval.lm_eval_backend --model "
                            "fastxlstm --model_args pretrained=DIR ...", no_args_is_help=True)



def write_json(path: Path, data: dict) -> None:
    """Write ``data`` as JSON atomically (a temporary file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def _load(model: str, device: str | None, dtype, quantization: str | None = None):
    from ..checkpoint import load_model_and_tokenizer
    from ..options import console, fail

    try:
        net, tok = load_model_and_tokenizer(model, device=device, dtype=dtype, weight_mode="fused",
                                            quantization=quantization)
    except (FileNotFoundError, NotADirectoryError, ValueError, KeyError) as e:
        fail(e)
    if model.startswith("random:"):
        console.print(f"[yellow]note:[/] {model} is a randomly initialised model: its scores are noise.")
    return net, tok


@eval_app.command("perplexity")
def perplexity_cmd(
    model: ModelOpt,
    data: Annotated[list[Path], typer.Option(help="Text file, JSONL file, directory of those, or a prepared "
                                                  "token-shard directory (meta.json); repeatable")],
    window: Annotated[int | None, typer.Option(
        min=1, help="Score non-overlapping windows of W tokens, each from a fresh state (the transformer "
                    "convention). Default: each document is one sequence with the recurrent state carried "
                    "through it; a recurrent model needs no sliding window (constant memory at any length)")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the numbers as JSON here")] = None,
    text_key: Annotated[str, typer.Option(help="Field holding the text in JSONL records")] = "text",
    split: Annotated[str, typer.Option(help="Split of a token-shard directory")] = "val",
    max_documents: Annotated[int | None, typer.Option(min=1, help="Score only the first N documents")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Sequences per forward (right-padded)")] = 8,
    chunk_size: Annotated[int, typer.Option(min=1, help="Tokens per forward chunk (bounds memory)")] = 4096,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    quantization: QuantizationOpt = None,
) -> None:
    """Perplexity, mean NLL and bits per byte of a model on held-out text, on the engine's fused forward.

    Every token of every document and its end-of-sequence token is scored; each document is preceded by a
    context-only token (the BOS when the tokenizer inserts one, else the end-of-sequence token)."""
    from ..engine.runner import Runner
    from ..model.quant import model_quantization
    from ..options import fail
    from .perplexity import load_documents, perplexity, prefix_token

    net, tok = _load(model, device, dtype, quantization)
    try:
        docs = load_documents(data, tok, text_key=text_key, split=split, max_documents=max_documents)
        result = perplexity(Runner(net, chunk_size=chunk_size), docs, prefix_token(tok), window=window,
                            batch_size=batch_size, progress=True)
    except (FileNotFoundError, ValueError, KeyError) as e:
        fail(e)
    out = result.to_dict() | {"model": model, "data": [str(d) for d in data], "device": str(net.device),
                              "dtype": str(net.dtype).removeprefix("torch."),
                              "quantization": (model_quantization(net) or (None,))[0]}
    mode = f"windows of {window}" if window else "documents, state carried"
    typer.echo(f"{model} on {', '.join(map(str, data))} ({mode}): {result.tokens:,} tokens in "
               f"{result.documents} documents, mean NLL {result.nll:.4f}, perplexity {result.perplexity:.3f}, "
               f"bits per byte {result.bits_per_byte:.4f}")
    if json_out is not None:
        write_json(json_out, out)


@eval_app.command("niah")
def niah_cmd(
    model: ModelOpt,
    lengths: Annotated[str, typer.Option(help="Context lengths in tokens, comma-separated; 'k' = 1024 "
                                              "(e.g. 4k,8k,16k,32k,64k,128k)")] = "1k,2k,4k",
    depths: Annotated[str, typer.Option(help="Needle depths, fractions of the haystack (0 = start, 1 = end)")]
        = "0,0.25,0.5,0.75,1",
    tasks: Annotated[str, typer.Option(help="single, multikey, multivalue (RULER's niah tasks), comma-separated")]
        = "single",
    samples: Annotated[int, typer.Option(min=1, help="Prompts per (task, length, depth) cell")] = 4,
    seed: Annotated[int, typer.Option(help="Seed of the keys, values and needle positions")] = 0,
    haystack: Annotated[Path | None, typer.Option(help="UTF-8 text file whose sentences form the haystack "
                                                       "(default: RULER's repeated noise sentences)")] = None,
    out: Annotated[Path, typer.Option(help="Directory for niah.json (config, grid, every prompt's answer) "
                                           "and niah.png (heatmaps)")] = Path("niah-results"),
    max_new_tokens: Annotated[int | None, typer.Option(min=1, help="Generated tokens per answer (default 32, "
                                                                   "64 for multivalue)")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts generated together (engine slots)")] = 4,
    chunk_size: Annotated[int, typer.Option(min=1, help="Prefill chunk in tokens (bounds memory at any length)")]
        = 4096,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    quantization: QuantizationOpt = None,
) -> None:
    """Needle-in-a-haystack retrieval over a grid of context lengths x needle depths (RULER's synthetic tasks,
    generated offline and seeded), greedy answers on the engine, scored by string match; prints the table and
    writes niah.json and niah.png. A recurrent model prefills any length in constant memory."""
    from ..engine import LLM
    from ..options import fail
    from . import niah

    try:
        length_list, depth_list = niah.parse_lengths(lengths), niah.parse_depths(depths)
        task_list = [t.strip() for t in tasks.split(",") if t.strip()]
        bad = [t for t in task_list if t not in niah.TASKS]
        if bad or not task_list:
            raise ValueError(f"unknown NIAH task(s) {', '.join(bad) or tasks!r}: use {', '.join(niah.TASKS)}")
    except ValueError as e:
        fail(str(e))
    net, tok = _load(model, device, dtype, quantization)
    llm = LLM(net, tok, max_slots=batch_size, prefill_chunk_size=chunk_size)
    try:
        prompts = niah.NiahBuilder(tok, haystack, seed).samples(task_list, length_list, depth_list, samples)
    except (OSError, ValueError) as e:
        fail(str(e))
    results = niah.run(niah.engine_generate(llm), prompts, max_new_tokens, batch_size, progress=True,
                       device=net.device)
    results = {"model": model, "device": str(net.device), "dtype": str(net.dtype).removeprefix("torch."),
               "config": niah.config_dict(task_list, length_list, depth_list, samples, seed, haystack,
                                          max_new_tokens)} | results
    typer.echo(niah.format_table(results))
    write_json(out / "niah.json", results)
    niah.plot(results, out / "niah.png", title=f"{model}: needle in a haystack")
    typer.echo(f"mean accuracy {results['mean']:.1f}%; wrote {out / 'niah.json'} and {out / 'niah.png'}")
