"""``fastxlstm bench``: the inference benchmark suite (fastxlstm and its peers, side by side)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

# The paper's grids (xLSTM 7B paper, section 4) and the headline subset that runs with every peer in one
# ~9-minute GPU call. Lists: decode batch sizes, TTFT prompt lengths, N of "generate N tokens" (batch 1),
# prefill (batch x length) shapes; "-" = none.
GRIDS: dict[str, dict[str, str]] = {
    "headline": {"batch_sizes": "1,8,32,128,256", "prompt_lengths": "2048,8192,32768,65536",
                 "generate_lengths": "1024", "prefill_shapes": "1x65536,8x8192,64x1024"},
    "decode": {"batch_sizes": "1,2,4,8,16,32,64,128,256", "prompt_lengths": "-", "generate_lengths": "-",
               "prefill_shapes": "-"},
    "ttft": {"batch_sizes": "-", "prompt_lengths": "128,256,512,1024,2048,4096,8192,16384,32768,65536,131072",
             "generate_lengths": "-", "prefill_shapes": "-"},
    "generate": {"batch_sizes": "-", "prompt_lengths": "-", "generate_lengths": "64,256,1024,4096,16384",
                 "prefill_shapes": "-"},
    "prefill": {"batch_sizes": "-", "prompt_lengths": "-", "generate_lengths": "-",
                "prefill_shapes": "1x65536,2x32768,4x16384,8x8192,16x4096,32x2048,64x1024,128x512"},
    "tiny": {"batch_sizes": "1,2", "prompt_lengths": "32,64", "generate_lengths": "8", "prefill_shapes": "2x32"},
}


def _ints(text: str) -> list[int]:
    if text.strip() == "-":
        return []
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise typer.BadParameter(f"expected comma-separated integers or '-', got {text!r}") from e


def _shapes(text: str) -> list[list[int]]:
    if text.strip() == "-":
        return []
    out = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        b, sep, s = item.partition("x")
        if not (sep and b.isdigit() and s.isdigit() and int(b) > 0 and int(s) > 0):
            raise typer.BadParameter(f"expected BATCHxLENGTH (e.g. 8x8192), got {item!r}")
        out.append([int(b), int(s)])
    return out


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
    systems: Annotated[str, typer.Option(help="comma-separated: fastxlstm,official,hf-xlstm,llama,mamba2")] = (
        "fastxlstm,official,hf-xlstm,llama,mamba2"),
    grid: Annotated[str, typer.Option(help=f"preset lists: {', '.join(GRIDS)} (the options below override)")] = (
        "headline"),
    batch_sizes: Annotated[str | None, typer.Option(help="decode batch sizes ('-': none)")] = None,
    prompt_lengths: Annotated[str | None, typer.Option(help="TTFT / memory prompt lengths ('-': none)")] = None,
    generate_lengths: Annotated[str | None, typer.Option(help="N for 'time to generate N tokens' ('-': none)")] = None,
    prefill_shapes: Annotated[str | None, typer.Option(help="prefill throughput shapes BxS, e.g. 8x8192")] = None,
    decode_steps: Annotated[int, typer.Option(min=4)] = 48,
    prefill_chunk: Annotated[int, typer.Option(min=64, help="fastxlstm prefill chunk (tokens)")] = 4096,
    deadline: Annotated[float, typer.Option(help="seconds per system")] = 300.0,
    deadlines: Annotated[str, typer.Option(help="per-system seconds, e.g. llama=240,hf-xlstm=60")] = "",
    budget: Annotated[float | None, typer.Option(help="wall-clock seconds for the whole run (cuts deadlines)")] = None,
    energy_s: Annotated[float, typer.Option(help="seconds per energy region (NVML); 0: no energy rows")] = 1.0,
    out_dir: Annotated[Path, typer.Option(help="where TAG.json and TAG.png go")] = Path("benchmarks/results"),
    tag: Annotated[str, typer.Option(help="file name stem of the results")] = "inference",
    update_md: Annotated[Path | None, typer.Option(help="rewrite the '## Inference' table in this file")] = None,
    small: Annotated[bool, typer.Option(help="tiny configs for every system (smoke test)")] = False,
    tiny: Annotated[bool, typer.Option(help="dry run: tiny configs and the tiny grid; runs on a CPU")] = False,
    state_dtype: Annotated[str, typer.Option(help="fastxlstm decode state store: float32 or bfloat16")] = "float32",
    quantization: Annotated[str, typer.Option(help="side by side: fastxlstm with these weights, e.g. bf16,fp8,int8 "
                                              "(the --quantization of generate/serve/eval, bf16 or none: "
                                              "unquantized; replaces --systems; the peers are not run)")] = "",
) -> None:
    """Decode tokens/s vs batch, TTFT and peak memory vs prompt length, prefill throughput, time and
    memory to generate N tokens, and joules per token, for fastxlstm and its peers."""
    from ..ops.quant import parse_quantization
    from .common import Plan
    from .driver import ORDER, failed_everywhere, run
    from .report import markdown, markdown_quant, plot, update_benchmarks_md

    chosen = [s.strip() for s in systems.split(",") if s.strip()]
    variants = [q.strip() for q in quantization.split(",") if q.strip()]
    if variants:
        chosen = []
        for q in variants:
            try:
                scheme = None if q.lower() == "bf16" else parse_quantization(q)
            except ValueError as e:
                raise typer.BadParameter(f"{e} (bf16: unquantized)", param_hint="--quantization") from None
            chosen.append("fastxlstm" if scheme is None else f"fastxlstm-{scheme}")
    bad = [s for s in chosen if s not in ORDER]
    if bad:
        raise typer.BadParameter(f"unknown systems {bad}; choose from {', '.join(ORDER)}")
    if tiny:
        grid, small, decode_steps, prefill_chunk = "tiny", True, 4, 64
    if grid not in GRIDS:
        raise typer.BadParameter(f"unknown grid {grid!r}; choose from {', '.join(GRIDS)}")
    lists = dict(GRIDS[grid])
    for key, given in (("batch_sizes", batch_sizes), ("prompt_lengths", prompt_lengths),
                       ("generate_lengths", generate_lengths), ("prefill_shapes", prefill_shapes)):
        if given is not None:
            lists[key] = given
    plan = Plan(batch_sizes=_ints(lists["batch_sizes"]), prompt_lengths=_ints(lists["prompt_lengths"]),
                generate_lengths=_ints(lists["generate_lengths"]), prefill_shapes=_shapes(lists["prefill_shapes"]),
                decode_steps=decode_steps, model=model, small=small, prefill_chunk=prefill_chunk,
                deadline_s=deadline, deadlines=_deadlines(deadlines), state_dtype=state_dtype, energy_s=energy_s,
                grid=grid)
    args = sys.argv[1:]  # `fastxlstm bench ...` or `python benchmarks/inference.py ...`
    command = "fastxlstm bench " + " ".join(shlex.quote(a) for a in (args[1:] if args[:1] == ["bench"] else args))
    results = run(plan, chosen, out_dir, tag=tag, command=command, budget_s=budget)
    png = plot(results, out_dir / f"{tag}.png")
    table = markdown_quant(results) if variants else markdown(results)
    typer.echo(table)
    for name, data in results["systems"].items():
        for err in data.get("errors", []):
            typer.echo(f"[{name}] {err['what']}: {err['error'][:300]}", err=True)
    if failed_everywhere(results):
        typer.echo(f"error: no system measured anything ({', '.join(results['systems'])}); see the errors above",
                   err=True)
        raise typer.Exit(1)
    if update_md is not None:
        body = (f"Device: {results.get('device', '?')}, bf16, date {results['date']}, command `{command}`; "
                f"raw results `{out_dir / (tag + '.json')}`" + (f", plot `{png}`" if png else "") + ".\n\n" + table)
        update_benchmarks_md(update_md, body)
