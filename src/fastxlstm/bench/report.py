"""Plots (PNG) and the markdown table of an inference benchmark result."""

from __future__ import annotations

import json
from pathlib import Path

LABELS = {"fastxlstm": "fastxlstm", "fastxlstm-fp8": "fastxlstm fp8", "fastxlstm-int8": "fastxlstm int8",
          "official": "official xlstm+mlstm_kernels", "hf-xlstm": "HF xLSTM",
          "llama": "HF Llama-3.1-8B (static+compile)", "mamba2": "HF Mamba2 Codestral-7B (mamba_ssm Triton)"}
PEERS = ("official", "hf-xlstm", "llama", "mamba2")
COLORS = {"fastxlstm": "tab:blue", "fastxlstm-fp8": "tab:cyan", "fastxlstm-int8": "tab:brown",
          "official": "tab:orange", "hf-xlstm": "tab:green", "llama": "tab:red", "mamba2": "tab:purple"}


def _key(row: dict, key: str):
    return (row["batch"], row["prompt_len"]) if key == "shape" else row[key]


def _rows(sysdata: dict, kind: str, key: str, value: str) -> dict:
    return {_key(r, key): r[value] for r in sysdata.get(kind, []) if r.get(value) is not None}


def plot(results: dict, path: str | Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = [("decode", "batch", "tok_s", "decode tokens/s vs batch size", "batch size", "tokens/s", True),
              ("ttft", "prompt_len", "ms", "time to first token vs prompt length", "prompt tokens", "ms", True),
              ("prefill", "shape", "tok_s", "prefill tokens/s at batch x length = const", "batch", "tokens/s",
               False),
              ("generate", "new_tokens", "s", "time to generate N tokens (batch 1)", "N", "s", True),
              ("ttft", "prompt_len", "peak_gb", "peak GPU memory while prefilling", "prompt tokens", "GB", False),
              ("decode", "batch", "j_per_token", "decode energy per token (idle subtracted)", "batch size", "J/token",
               True)]
    panels = [p for p in panels if any(_rows(d, p[0], p[1], p[2]) for d in results["systems"].values())]
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 4.4 * rows), squeeze=False)
    axes = axes.ravel()
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for ax, (kind, key, val, title, xl, yl, logy) in zip(axes, panels):
        for name, data in results["systems"].items():
            pts = sorted(_rows(data, kind, key, val).items())
            if pts:
                xs = [p[0][0] if isinstance(p[0], tuple) else p[0] for p in pts]
                ax.plot(xs, [p[1] for p in pts], marker="o", label=LABELS.get(name, name),
                        color=COLORS.get(name))
        ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
    # one legend for the figure: a system missing from the first panel still gets its entry
    handles = {}
    for ax in axes[:len(panels)]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=len(handles), fontsize=9,
               frameon=False)
    dev = results.get("device", "?")
    prec = "float32 dry run" if dev == "cpu" else "bf16"
    fig.suptitle(f"7B-class inference, random weights, {dev}, {prec}, {results.get('date', '')}")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(v: float | None, unit: str) -> str:
    if v is None or v != v:  # missing or NaN (no GPU memory figure on a CPU)
        return "-"
    if unit == "tok/s":
        return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"
    if unit == "ms":
        return f"{v:,.1f}"
    if unit == "J":
        return f"{v:.3g}"
    return f"{v:.2f}" if unit in ("GB", "s") else f"{v:.3g}"


def markdown(results: dict) -> str:
    """The headline table: one row per figure, our value, each peer's and the ratio."""
    systems = results["systems"]
    ours = systems.get("fastxlstm", {})
    peers = [p for p in PEERS if p in systems]
    head = ["figure", "fastxlstm"] + [f"{LABELS[p]}" for p in peers] + [f"x vs {p}" for p in peers]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    specs = [("decode", "batch", "tok_s", "decode tok/s, batch {}", "tok/s", True),
             ("decode_bf16_state", "batch", "tok_s", "decode tok/s, batch {}, opt-in bf16 C state (peers: their "
              "default)", "tok/s", True),
             ("ttft", "prompt_len", "ms", "TTFT ms, prompt {}", "ms", False),
             ("ttft", "prompt_len", "peak_gb", "peak GB, prefill {}", "GB", False),
             ("prefill", "shape", "tok_s", "prefill tok/s, batch x length {}", "tok/s", True),
             ("generate", "new_tokens", "s", "generate {} tokens, s (batch 1)", "s", False),
             ("generate", "new_tokens", "peak_gb", "peak GB, generate {} tokens", "GB", False),
             ("decode", "batch", "j_per_token", "decode J/token, batch {}", "J", False),
             ("ttft", "prompt_len", "j_per_token", "prefill J/token, prompt {}", "J", False)]
    for kind, key, val, label, unit, higher_better in specs:
        peer_kind = "decode" if kind == "decode_bf16_state" else kind
        keys = set(_rows(ours, kind, key, val))
        if peer_kind == kind:
            keys |= {k for p in peers for k in _rows(systems[p], kind, key, val)}
        for k in sorted(keys):
            mine = _rows(ours, kind, key, val).get(k)
            vals = [_rows(systems[p], peer_kind, key, val).get(k) for p in peers]
            ratios = []
            for v in vals:
                if mine is None or v is None or not (v and mine) or v != v or mine != mine:
                    ratios.append("-")
                else:
                    ratios.append(f"{(mine / v if higher_better else v / mine):.2f}x")
            kk = f"{k // 1024}k" if key == "prompt_len" and k >= 1024 else str(k)
            if key == "shape":
                kk = f"{k[0]} x {k[1] // 1024}k" if k[1] >= 1024 else f"{k[0]} x {k[1]}"
            lines.append("| " + " | ".join([label.format(kk), _fmt(mine, unit)] + [_fmt(v, unit) for v in vals]
                                           + ratios) + " |")
    return "\n".join(lines)


def markdown_quant(results: dict) -> str:
    """The ``--quantization`` table: bf16 / fp8 / int8 side by side, each quantized variant's ratio to
    bf16 (above 1: the quantized variant is better: faster, or less memory), and its KL from bf16."""
    systems = results["systems"]
    names = [n for n in ("fastxlstm", "fastxlstm-fp8", "fastxlstm-int8") if n in systems]
    quant = [n for n in names if n != "fastxlstm"]
    base = systems.get("fastxlstm", {})
    head = ["figure"] + [LABELS.get(n, n) for n in names] + [f"{LABELS.get(n, n)} / bf16" for n in quant
                                                             if "fastxlstm" in systems]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    specs = [("decode", "batch", "tok_s", "decode tok/s, batch {}", "tok/s", True),
             ("ttft", "prompt_len", "ms", "TTFT ms, prompt {}", "ms", False),
             ("ttft", "prompt_len", "peak_gb", "peak GB, prefill {}", "GB", False),
             ("generate", "new_tokens", "s", "generate {} tokens, s (batch 1)", "s", False)]
    for kind, key, val, label, unit, higher_better in specs:
        keys = sorted({k for n in names for k in _rows(systems[n], kind, key, val)})
        for k in keys:
            vals = [_rows(systems[n], kind, key, val).get(k) for n in names]
            ratios = []
            if "fastxlstm" in systems:
                b = _rows(base, kind, key, val).get(k)
                for n in quant:
                    v = _rows(systems[n], kind, key, val).get(k)
                    ratios.append("-" if not v or not b else f"{(v / b if higher_better else b / v):.2f}x")
            kk = f"{k // 1024}k" if key == "prompt_len" and k >= 1024 else str(k)
            lines.append("| " + " | ".join([label.format(kk)] + [_fmt(v, unit) for v in vals] + ratios) + " |")
    lines.append("| weights GB | " + " | ".join(_fmt(systems[n].get("weights_gb"), "GB") for n in names)
                 + " |" + " |" * len(quant if "fastxlstm" in systems else []))
    for what in ("kl_vs_bf16_prefill", "kl_vs_bf16_decode_b1", "top1_agree_prefill", "top1_agree_decode_b1"):
        cells = [f"{systems[n]['quantization'][what]:.3g}" if "quantization" in systems[n] else "-" for n in names]
        lines.append(f"| {what} | " + " | ".join(cells) + " |" + " |" * len(quant if "fastxlstm" in systems else []))
    return "\n".join(lines)


def update_benchmarks_md(md_path: str | Path, section_body: str, heading: str = "## Inference") -> None:
    """Replace the body of ``heading`` in BENCHMARKS.md (other sections untouched); create if missing."""
    path = Path(md_path)
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = text.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == heading)
    except StopIteration:
        path.write_text(text.rstrip("\n") + f"\n\n{heading}\n\n{section_body.strip()}\n")
        return
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    new = lines[:start + 1] + ["", *section_body.strip().splitlines(), ""] + lines[end:]
    path.write_text("\n".join(new).rstrip("\n") + "\n")


def load(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())
