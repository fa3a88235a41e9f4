"""Needle-in-a-haystack long-context retrieval (RULER's synthetic NIAH tasks, generated offline), on the engine.

A prompt of exactly ``length`` tokens: RULER's instruction, a haystack with one or more needles ("One of the
special magic numbers for {key} is: {value}."), then the question and the answer prefix. The model continues
greedily; the score is RULER's ``string_match_all``: the fraction of the expected values that appear in the
continuation (case-insensitive), so single-value tasks score 0 or 1.

Tasks (RULER ``niah_single`` / ``niah_multikey`` / ``niah_multivalue``, 4 needles in the multi tasks):

* ``single``: one needle; the question asks for its value.
* ``multikey``: 4 needles with different keys; the question asks for one of them (the distractors have other keys).
* ``multivalue``: 4 needles with the same key and different values; all 4 must be given.

The needle that is asked for (the first one for ``multivalue``) sits at the grid's depth (0 = right after the
instruction, 1 = right before the question) at the nearest sentence boundary; the other needles sit at random
sentence boundaries. The haystack is RULER's repeated "noise" sentences or the sentences of a given text file,
cycled as needed. Keys (adjective-noun) and 7-digit values are drawn from a seeded RNG per
(seed, task, length, depth, sample), so the prompts are the same on every run and machine.

The prompt is built in token space (the haystack's sentences are tokenised once and concatenated), so that every
prompt of a length has exactly that many tokens: the engine prefills equal-length prompts together, chunked
(constant memory at any length: the recurrent state does not grow with the context).
"""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
# RULER's niah template (lm-eval's ruler/prepare_niah.py): singular wording when one value is asked for
INSTRUCTION = ("A special magic number is hidden within the following text. Make sure to memorize it. "
               "I will quiz you about the number afterwards.\n")
INSTRUCTION_ALL = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
                   "I will quiz you about the numbers afterwards.\n")
NEEDLE = " One of the special magic numbers for {key} is: {value}."
QUESTION = ("\nWhat is the special magic number for {key} mentioned in the provided text? "
            "The special magic number for {key} mentioned in the provided text is")
QUESTION_ALL = ("\nWhat are all the special magic numbers for {key} mentioned in the provided text? "
                "The special magic numbers for {key} mentioned in the provided text are")
TASKS = ("single", "multikey", "multivalue")
NEEDLES = {"single": 1, "multikey": 4, "multivalue": 4}
MAX_NEW_TOKENS = {"single": 32, "multikey": 32, "multivalue": 64}
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
_ADJECTIVES = ("amber", "brave", "calm", "damp", "eager", "faint", "gentle", "hollow", "icy", "jolly", "keen",
               "lively", "mellow", "nimble", "odd", "proud", "quiet", "rapid", "silent", "tidy", "upbeat", "vivid",
               "wary", "young", "zesty", "bitter", "crisp", "dusty", "early", "fierce")
_NOUNS = ("anchor", "badger", "candle", "dolphin", "engine", "falcon", "garden", "harbor", "island", "jacket",
          "kettle", "lantern", "meadow", "needle", "orchard", "pepper", "quarry", "river", "saddle", "tunnel",
          "umbrella", "valley", "walnut", "yacht", "zebra", "bridge", "castle", "desert", "forest", "glacier")


@dataclass
class Sample:
    """One prompt: its ``task``, ``length`` (tokens, exact) and ``depth``, the token ``ids``, where the asked
    needle starts (``needle_token``, an index into ``ids``), the ``key`` asked for and the expected ``answers``."""

    task: str
    length: int
    depth: float
    index: int
    ids: list[int]
    needle_token: int
    key: str
    answers: list[str]


def parse_lengths(text: str) -> list[int]:
    """``"4096,8k,128k"`` -> ``[4096, 8192, 131072]`` (``k`` = 1024, as RULER's 4k/128k)."""
    out = []
    for part in (p.strip().lower() for p in text.split(",") if p.strip()):
        try:
            n = int(part[:-1]) * 1024 if part.endswith("k") else int(part)
        except ValueError:
            raise ValueError(f"context length {part!r} is not an integer or <n>k") from None
        if n < 1:
            raise ValueError(f"context length must be positive, got {part!r}")
        out.append(n)
    if not out:
        raise ValueError("no context lengths given")
    return out


def parse_depths(text: str) -> list[float]:
    """``"0,0.5,1"`` -> ``[0.0, 0.5, 1.0]`` (fractions of the haystack, each in [0, 1])."""
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            d = float(part)
        except ValueError:
            raise ValueError(f"needle depth {part!r} is not a number") from None
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"needle depth must be in [0, 1], got {part!r}")
        out.append(d)
    if not out:
        raise ValueError("no needle depths given")
    return out


def haystack_sentences(path: str | Path | None = None) -> list[str]:
    """The haystack's sentences: RULER's noise, or a UTF-8 text file's sentences (whitespace collapsed)."""
    if path is None:
        return re.findall(r"[^.]+\.", NOISE)
    text = " ".join(Path(path).read_text(encoding="utf-8").split())
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", text) if s]
    if not sentences:
        raise ValueError(f"{path}: no text for a haystack")
    return sentences


class NiahBuilder:
    """Builds :class:`Sample` prompts for one tokenizer and haystack (its sentences tokenised once)."""

    def __init__(self, tokenizer, haystack: str | Path | None = None, seed: int = 0):
        self.tok = tokenizer
        self.seed = seed
        sentences = haystack_sentences(haystack)
        self._sentences = [self._ids(" " + s.strip()) for s in sentences]
        self._sentences = [s for s in self._sentences if s]
        self._prefix = {task: tokenizer.encode(INSTRUCTION_ALL if task == "multivalue" else INSTRUCTION)
                        for task in TASKS}

    def _ids(self, text: str) -> list[int]:
        return self.tok.encode(text, add_bos=False)

    def _haystack(self, budget: int) -> tuple[list[int], list[int]]:
        """``budget`` haystack tokens (the cycled sentences, the last one cut) and the sentence boundaries."""
        ids: list[int] = []
        bounds = [0]
        i = 0
        while len(ids) < budget:
            ids.extend(self._sentences[i % len(self._sentences)])
            bounds.append(min(len(ids), budget))
            i += 1
        return ids[:budget], sorted(set(bounds))

    def sample(self, task: str, length: int, depth: float, index: int) -> Sample:
        if task not in TASKS:
            raise ValueError(f"unknown NIAH task {task!r}: one of {', '.join(TASKS)}")
        rng = random.Random(f"{self.seed}:{task}:{length}:{depth}:{index}")
        count = NEEDLES[task]
        keys = [f"{a}-{n}" for a, n in rng.sample([(a, n) for a in _ADJECTIVES for n in _NOUNS], count)]
        if task == "multivalue":
            keys = [keys[0]] * count
        values = [str(v) for v in rng.sample(range(1_000_000, 10_000_000), count)]
        needles = [self._ids(NEEDLE.format(key=k, value=v)) for k, v in zip(keys, values)]
        question = self._ids((QUESTION_ALL if task == "multivalue" else QUESTION).format(key=keys[0]))
        prefix = self._prefix[task]
        budget = length - len(prefix) - len(question) - sum(map(len, needles))
        if budget < 1:
            raise ValueError(f"context length {length} is too short for the {task} prompt (at least "
                             f"{length - budget + 1} tokens with this tokenizer)")
        hay, bounds = self._haystack(budget)
        asked = min(bounds, key=lambda b: (abs(b - depth * budget), b))
        others = [rng.choice(bounds) for _ in range(count - 1)]
        # insert from the back so earlier positions stay valid; the asked needle goes first at its position
        placed = sorted([(asked, 0)] + [(pos, j + 1) for j, pos in enumerate(others)], reverse=True)
        ids = list(hay)
        for pos, j in placed:
            ids[pos:pos] = needles[j]
        needle_token = len(prefix) + asked + sum(len(needles[j]) for pos, j in placed if pos < asked)
        ids = prefix + ids + question
        answers = values if task == "multivalue" else [values[0]]
        return Sample(task, length, depth, index, ids, needle_token, keys[0], answers)

    def samples(self, tasks: Sequence[str], lengths: Sequence[int], depths: Sequence[float],
                per_cell: int) -> list[Sample]:
        return [self.sample(t, n, d, i) for t in tasks for n in lengths for d in depths for i in range(per_cell)]


def score(prediction: str, answers: Sequence[str]) -> float:
    """RULER's ``string_match_all``: the fraction of ``answers`` found in ``prediction`` (case-insensitive)."""
    pred = prediction.lower()
    return sum(a.lower() in pred for a in answers) / len(answers)


GenerateFn = Callable[[list[list[int]], int], list[str]]


def engine_generate(llm) -> GenerateFn:
    """Greedy continuations on :class:`fastxlstm.LLM` (its chunked prefill and continuous batching)."""
    return lambda prompts, n: [r.text for r in llm.generate(prompts, max_new_tokens=n, temperature=0.0)]


def run(generate: GenerateFn, samples: Sequence[Sample], max_new_tokens: int | None = None, batch_size: int = 8,
        progress: bool = False, device: torch.device | str | None = None) -> dict:
    """Generate and score every sample; returns the JSON-ready results (see :func:`summarize`). Samples of one
    task and length are generated ``batch_size`` at a time; on CUDA the peak memory of each length is recorded."""
    records: list[dict] = []
    memory: dict[int, float] = {}
    seconds: dict[int, float] = {}
    cuda = device is not None and torch.device(device).type == "cuda"
    groups: dict[tuple[str, int], list[Sample]] = {}
    for s in samples:
        groups.setdefault((s.task, s.length), []).append(s)
    bar = tqdm(total=len(samples), unit="prompt", desc="niah", disable=not progress)
    for (task, length), group in sorted(groups.items(), key=lambda kv: kv[0][1]):
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        for b0 in range(0, len(group), batch_size):
            batch = group[b0:b0 + batch_size]
            bar.set_postfix_str(f"{task} {length} tok")
            texts = generate([s.ids for s in batch], max_new_tokens or MAX_NEW_TOKENS[task])
            for s, text in zip(batch, texts):
                records.append({"task": s.task, "length": s.length, "depth": s.depth, "index": s.index,
                                "prompt_tokens": len(s.ids), "needle_token": s.needle_token, "key": s.key,
                                "answers": s.answers, "prediction": text, "score": score(text, s.answers)})
            bar.update(len(batch))
        seconds[length] = seconds.get(length, 0.0) + time.perf_counter() - t0
        if cuda:
            memory[length] = max(memory.get(length, 0.0), torch.cuda.max_memory_allocated(device) / 2**30)
    bar.close()
    return summarize(records) | {"seconds": {str(k): v for k, v in seconds.items()},
                                 "peak_memory_gib": {str(k): v for k, v in memory.items()}}


def summarize(records: Sequence[dict]) -> dict:
    """``grid[task][length][depth]`` mean score (percent), per-length means over tasks and depths, the overall
    mean, and the ``samples`` (one record per prompt)."""
    cells: dict[str, dict[str, dict[str, list[float]]]] = {}
    by_length: dict[str, list[float]] = {}
    for r in records:
        cells.setdefault(r["task"], {}).setdefault(str(r["length"]), {}).setdefault(str(r["depth"]), []).append(
            r["score"])
        by_length.setdefault(str(r["length"]), []).append(r["score"])
    mean = lambda xs: 100.0 * math.fsum(xs) / len(xs)  # noqa: E731
    grid = {t: {n: {d: mean(v) for d, v in ds.items()} for n, ds in ns.items()} for t, ns in cells.items()}
    return {"grid": grid, "by_length": {n: mean(v) for n, v in by_length.items()},
            "mean": mean([r["score"] for r in records]) if records else float("nan"), "samples": list(records)}


def format_table(results: dict) -> str:
    """A plain-text table: one row per (task, depth), one column per length, the mean row per length."""
    grid = results["grid"]
    lengths = sorted({int(n) for ns in grid.values() for n in ns})
    head = ["task", "depth", *(f"{n:,}" for n in lengths)]
    rows = []
    for task, ns in grid.items():
        depths = sorted({float(d) for ds in ns.values() for d in ds})
        for d in depths:
            rows.append([task, f"{d:g}", *(f"{ns.get(str(n), {}).get(str(d), float('nan')):.1f}" for n in lengths)])
    rows.append(["mean", "", *(f"{results['by_length'][str(n)]:.1f}" for n in lengths)])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(head), "  ".join("-" * w for w in widths), *map(fmt, rows)])


def plot(results: dict, path: str | Path, title: str = "") -> None:
    """A PNG heatmap per task: accuracy (%) by needle depth (rows) and context length (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = results["grid"]
    tasks = list(grid)
    fig, axes = plt.subplots(1, len(tasks), figsize=(1.2 + 4.2 * len(tasks), 3.8), squeeze=False)
    for k, (ax, task) in enumerate(zip(axes[0], tasks)):
        lengths = sorted(grid[task], key=int)
        depths = sorted({d for ds in grid[task].values() for d in ds}, key=float)
        acc = [[grid[task][n].get(d, math.nan) for n in lengths] for d in depths]
        im = ax.imshow(acc, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
        for i, row in enumerate(acc):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)), [f"{int(n) // 1024}k" if int(n) % 1024 == 0 else n for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{float(d):g}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        if k == 0:
            ax.set_ylabel("needle depth")
        ax.set_title(task)
    fig.colorbar(im, ax=axes[0].tolist(), label="accuracy (%)")
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)


def config_dict(tasks, lengths, depths, per_cell, seed, haystack, max_new_tokens) -> dict:
    return {"tasks": list(tasks), "lengths": list(lengths), "depths": list(depths), "samples_per_cell": per_cell,
            "seed": seed, "haystack": str(haystack) if haystack else "noise", "max_new_tokens": max_new_tokens}


__all__ = ["NiahBuilder", "Sample", "config_dict", "engine_generate", "format_table", "parse_depths",
           "parse_lengths", "plot", "run", "score", "summarize"]
