"""The lm-evaluation-harness model type ``fastxlstm`` (``pip install fastxlstm[eval]``), on the engine.

lm-eval has no plugin entry point for models, so the type is registered when this module is imported:

* command line: ``python -m fastxlstm.eval.lm_eval_backend`` is lm-eval's own command line (every option of
  ``lm_eval``) with ``fastxlstm`` registered, e.g. ``python -m fastxlstm.eval.lm_eval_backend --model
  fastxlstm --model_args pretrained=NX-AI/xLSTM-7b,dtype=bfloat16 --tasks hellaswag --batch_size 16``;
* Python: ``import fastxlstm.eval.lm_eval_backend`` then ``lm_eval.simple_evaluate(model="fastxlstm",
  model_args=...)``, or pass ``FastXLSTMLM(pretrained=...)`` (or an existing ``fastxlstm.LLM``) as ``model``.

``model_args``: ``pretrained`` (directory, hub id or ``random:<preset>``), ``dtype`` (auto, half, bfloat16,
float16, float32, as the CLI's ``--dtype``; auto: bf16 on GPU, fp32 on CPU), ``quantization`` (int8, fp8 or
none, as ``--quantization``), ``device``, ``batch_size`` (rows per forward; lm-eval's ``--batch_size``),
``max_slots`` (concurrent generations), ``chunk_size`` (prefill chunk), ``add_bos_token`` (default: the
model's ``force_bos_token_insert``), ``prefix_token_id`` (context of an empty context, default BOS else EOS,
as lm-eval's ``hf``), ``max_gen_toks`` (256), ``max_length``.

``loglikelihood``: requests whose contexts share all but their last token share one recurrent state (the
context is prefilled once per batch, its state forked into one row per continuation), continuations are
scored in batches by :meth:`fastxlstm.engine.Runner.token_logprobs`. ``loglikelihood_rolling``: each
document is one sequence with the state carried (no windows: a recurrent model has no context limit and
constant memory). ``generate_until``: :meth:`fastxlstm.LLM.generate` with the stop sequences (greedy unless
the task asks for sampling). Inputs are never truncated, unlike the ``hf`` backend's ``max_length`` cut.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..extras import require

require("eval", ("lm_eval",), feature="the lm-eval backend fastxlstm")

import lm_eval.models  # noqa: E402, F401 - lm-eval's own types first: it skips them once its registry is non-empty
import torch  # noqa: E402
from lm_eval.api.model import TemplateLM  # noqa: E402
from lm_eval.api.registry import register_model  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from ..engine import LLM  # noqa: E402
from ..ops import State  # noqa: E402
from .perplexity import score_sequences  # noqa: E402

DEFAULT_BATCH = 16


def _batch_size(value: int | str | None) -> int:
    if value is None or str(value).startswith("auto"):
        return DEFAULT_BATCH
    n = int(value)
    if n < 1:
        raise ValueError(f"batch_size must be at least 1, got {value}")
    return n


def _bool(value) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    return str(value).lower() in ("1", "true", "yes")


@register_model("fastxlstm")
class FastXLSTMLM(TemplateLM):
    """lm-eval ``LM`` over a :class:`fastxlstm.LLM` (see the module docstring for the arguments)."""

    def __init__(self, pretrained: str | LLM, dtype: str | torch.dtype | None = None, device: str | None = None,
                 batch_size: int | str | None = DEFAULT_BATCH, max_batch_size: int | None = None,
                 max_slots: int = 8, chunk_size: int = 4096, add_bos_token: bool | None = None,
                 prefix_token_id: int | None = None, max_gen_toks: int = 256, max_length: int = 2**20,
                 backend: str = "auto", quantization: str | None = None, **kwargs):
        super().__init__()
        if kwargs:
            raise ValueError(f"unknown model_args for fastxlstm: {', '.join(sorted(kwargs))}")
        if isinstance(pretrained, LLM):
            self.llm = pretrained
        else:
            self.llm = LLM(pretrained, device=device, dtype=dtype, max_slots=int(max_slots),
                           prefill_chunk_size=int(chunk_size), backend=backend, quantization=quantization)
        if self.llm.tokenizer is None:
            raise ValueError("the fastxlstm lm-eval backend needs a model with a tokenizer")
        self.tok = self.llm.tokenizer
        self.runner = self.llm.engine.runner
        self.batch_size = _batch_size(batch_size)
        self.add_bos = self.tok.add_bos if _bool(add_bos_token) is None else _bool(add_bos_token)
        self._prefix = prefix_token_id
        self._max_gen_toks = int(max_gen_toks)
        self._max_length = int(max_length)

    # ------------------------------------------------------------------ tokens
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self._prefix is not None:
            return int(self._prefix)
        return self.tok.bos_token_id if self.tok.bos_token_id is not None else self.tok.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def device(self) -> torch.device:
        return self.runner.device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        add_bos = self.add_bos if add_special_tokens is None else (add_special_tokens and self.add_bos)
        if add_bos and self.tok.bos_token_id is not None and string.startswith(self.tok.decode(
                [self.tok.bos_token_id], skip_special_tokens=False)):
            add_bos = False  # the string already starts with BOS
        return self.tok.encode(string, add_bos=add_bos)

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    # -------------------------------------------------------------- scoring
    def _prefill(self, prefixes: list[tuple[int, ...]]) -> dict[tuple[int, ...], list[State]]:
        """The state after each (non-empty) prefix, one row each, prefilled in batches."""
        out: dict[tuple[int, ...], list[State]] = {}
        prefixes = sorted(prefixes, key=len, reverse=True)
        for b0 in range(0, len(prefixes), self.batch_size):
            batch = prefixes[b0:b0 + self.batch_size]
            ids = torch.zeros(len(batch), len(batch[0]), dtype=torch.long)
            for j, p in enumerate(batch):
                ids[j, :len(p)] = torch.tensor(p)
            _, state = self.runner.forward_tokens(ids.to(self.device), lengths=[len(p) for p in batch])
            for j, p in enumerate(batch):
                out[p] = [tuple(t[j:j + 1] for t in layer) for layer in state]
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """Each request ``((context, continuation), context_ids, continuation_ids)`` is scored as the
        continuation after the state of ``context_ids[:-1]`` (shared by every request with that prefix)
        fed with ``context_ids[-1:] + continuation_ids[:-1]``."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (_, ctx, cont) in enumerate(requests):
            if not ctx or not cont:
                raise ValueError(f"request {i}: empty context or continuation after tokenisation")
            groups.setdefault(tuple(ctx[:-1]), []).append(i)
        order = [(key, i) for key in sorted(groups, key=len, reverse=True)
                 for i in sorted(groups[key], key=lambda i: -len(requests[i][2]))]
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        cache: dict[tuple[int, ...], list[State]] = {}
        bar = tqdm(total=len(requests), desc="fastxlstm loglikelihood", disable=disable_tqdm)
        for b0 in range(0, len(order), self.batch_size):
            batch = order[b0:b0 + self.batch_size]
            keys = list(dict.fromkeys(k for k, _ in batch))
            cache = {k: v for k, v in cache.items() if k in keys}  # a group may span consecutive batches
            cache.update(self._prefill([k for k in keys if k and k not in cache]))
            seqs = [requests[i][1][-1:] + requests[i][2] for _, i in batch]
            lengths = [len(s) - 1 for s in seqs]
            ids = torch.zeros(len(batch), max(lengths) + 1, dtype=torch.long)
            for j, s in enumerate(seqs):
                ids[j, :len(s)] = torch.tensor(s)
            ids = ids.to(self.device)
            scores = self.runner.token_logprobs(ids[:, :-1], ids[:, 1:], self._fork(batch, cache), lengths)
            sums = scores.logprobs.double().sum(1).tolist()
            greedy = [bool(g[:n].all()) for g, n in zip(scores.greedy.cpu(), lengths)]
            for (_, i), total, is_greedy in zip(batch, sums, greedy):
                results[i] = (total, is_greedy)
                self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
            bar.update(len(batch))
        bar.close()
        return results  # type: ignore[return-value]

    @staticmethod
    def _fork(batch, cache: dict[tuple[int, ...], list[State]]) -> list[State] | None:
        """One state row per request (copies of its prefix's state; zeros for an empty prefix)."""
        rows = [cache.get(k) for k, _ in batch]
        like = next((r for r in rows if r is not None), None)
        if like is None:
            return None
        return [tuple(torch.cat([(r[blk][t] if r is not None else torch.zeros_like(like[blk][t])) for r in rows])
                      for t in range(3)) for blk in range(len(like))]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihood: ``[prefix_token] + tokens``, state carried, no windows."""
        seqs = [[self.prefix_token_id, *self.tok_encode(req.args[0])] for req in requests]
        sums = score_sequences(self.runner, seqs, self.batch_size, progress=not disable_tqdm)
        for req, total in zip(requests, sums):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return sums

    # ------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or the task's sampling) generation on the engine, stopped at the task's ``until``
        strings and EOS; requests with the same generation arguments run as one continuous batch."""
        out: list[str | None] = [None] * len(requests)
        by_kwargs: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            by_kwargs.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        bar = tqdm(total=len(requests), desc="fastxlstm generate_until", disable=disable_tqdm)
        for idx in by_kwargs.values():
            kw = dict(requests[idx[0]].args[1])
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kw.pop("temperature", 0.0)) if kw.pop("do_sample", False) else 0.0
            prompts = [self.tok_encode(requests[i].args[0]) or [self.prefix_token_id] for i in idx]
            results = self.llm.generate(prompts, max_new_tokens=max_new, temperature=temperature,
                                        stop=[s for s in until if s], seed=kw.pop("seed", None))
            for i, r in zip(idx, results):
                out[i] = r.text
                self.cache_hook.add_partial("generate_until", requests[i].args, r.text)
            bar.update(len(idx))
        bar.close()
        return out  # type: ignore[return-value]


def main(argv: Sequence[str] | None = None) -> None:
    """lm-eval's command line with the ``fastxlstm`` model type registered."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":  # pragma: no cover
    main()
