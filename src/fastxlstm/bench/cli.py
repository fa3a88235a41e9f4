"""``fastxlstm bench``: the inference benchmark suite (fastxlstm and its peers, side by side)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}") from e


def _deadlines(text: str) -> dict[str, float]:
    out = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, _, sec = item.partition("=")
        try:
            out[name.strip()] = float(sec)
        except ValueError as e:
            raise typer.BadParameter(f"expected name=seconds, got {item!r}") from e
    return out


def bench(
    model: Annotated[str, typer.Option(help="fastxlstm model: directory, hub id or random:<preset>")] = (
        "random:xlstm-7b"),
    systems: Annotated[str, typer.Option(help="comma-separated: fastxlstm,official,hf-xlstm,llama")] = (
        "fastxlstm,official,hf-xlstm,llama"),
    batch_sizes: Annotated[str, typer.Option(help="decode batch sizes")] = "1,8,32,128,256",
    prompt_lengths: Annotated[str, typer.Option(help="TTFT / memory prompt lengths")] = "2048,8192,32768,65536",
    generate_lengths: Annotated[str, typer.Option(help="N for 'time to generate N tokens'")] = "256,1024",
    decode_steps: Annotated[int, typer.Option(min=4)] = 48,
    prefill_chunk: Annotated[int, typer.Option(min=64, help="fastxlstm prefill chunk (tokens)")] = 4096,
    deadline: Annotated[float, typer.Option(help="seconds per system")] = 300.0,
    deadlines: Annotated[str, typer.Option(help="per-system seconds, e.g. llama=240,hf-xlstm=60")] = "",
    out_dir: Annotated[Path, typer.Option(help="where inference.json and inference.png go")] = Path(
        "benchmarks/results"),
    tag: Annotated[str, typer.Option(help="file name stem of the results")] = "inference",
    update_md: Annotated[Path | None, typer.Option(help="rewrite the '## Inference' table in this file")] = None,
    small: Annotated[bool, typer.Option(help="tiny configs for every system (smoke test)")] = False,
    state_dtype: Annotated[str, typer.Option(help="fastxlstm decode state store: float32 or bfloat16")] = "float32",
    quantization: Annotated[str, typer.Option(help="side by side: fastxlstm with these weights, e.g. bf16,fp8,int8 "
                                              "(replaces --systems; the peers are not run)")] = "",
) -> None:
    """Decode tokens/s vs batch, TTFT and peak memory vs prompt length, time to generate N tokens."""
    from .common import Plan
    from .driver import ORDER, run
    from .report import markdown, markdown_quant, plot, update_benchmarks_md

    chosen = [s.strip() for s in systems.split(",") if s.strip()]
    variants = [q.strip() for q in quantization.split(",") if q.strip()]
    if variants:
        bad = [q for q in variants if q not in ("bf16", "fp8", "int8")]
        if bad:
            raise typer.BadParameter(f"unknown --quantization {bad}; choose from bf16, fp8, int8")
        chosen = ["fastxlstm" if q == "bf16" else f"fastxlstm-{q}" for q in variants]
    bad = [s for s in chosen if s not in ORDER]
    if bad:
        raise typer.BadParameter(f"unknown systems {bad}; choose from {', '.join(ORDER)}")
    plan = Plan(batch_sizes=_ints(batch_sizes), prompt_lengths=_ints(prompt_lengths),
                generate_lengths=_ints(generate_lengths), decode_steps=decode_steps, model=model, small=small,
                prefill_chunk=prefill_chunk, deadline_s=deadline, deadlines=_deadlines(deadlines),
                state_dtype=state_dtype)
    command = "fastxlstm bench " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    results = run(plan, chosen, out_dir, tag=tag, command=command)
    png = plot(results, out_dir / f"{tag}.png")
    table = markdown_quant(results) if variants else markdown(results)
    typer.echo(table)
    for name, data in results["systems"].items():
        for err in data.get("errors", []):
            typer.echo(f"[{name}] {err['what']}: {err['error'][:300]}", err=True)
    if update_md is not None:
        body = (f"Device: {results.get('device', '?')}, bf16, date {results['date']}, command `{command}`; "
                f"raw results `{out_dir / (tag + '.json')}`" + (f", plot `{png}`" if png else "") + ".\n\n" + table)
        update_benchmarks_md(update_md, body)
