"""The grammar engine of structured output: xgrammar (``pip install 'fastxlstm[serve]'``).

:class:`Grammars` compiles a :class:`~fastxlstm.serving.structured.GrammarSpec` for the server's tokenizer
(a cache of compiled grammars, compilation in its own thread with a deadline, never on the event loop);
:class:`Matcher` is one sequence's position in its grammar: the scheduler advances it with each token it
reads and fills the next step's allowed-token bitmask (int32 words, bit ``t % 32`` of word ``t // 32`` set:
token ``t`` allowed), which the one on-device sampler applies (``SlotSampler.set_masks``).

With the scheduler in its own process (``--scheduler-process``) the HTTP side still compiles (its errors are the
request's 400s) and hands the worker a :class:`SerializedGrammar`: xgrammar's own JSON of the compiled grammar and
of the tokenizer's vocabulary, plain text that the worker turns back into a compiled grammar
(:class:`GrammarStore`, once per distinct grammar) where its matchers and sampler run."""

from __future__ import annotations

import asyncio
import json
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

from ..tokenizer import Tokenizer
from .structured import GrammarSpec, StructuredError

COMPILE_TIMEOUT = 10.0  # seconds one grammar may take to compile (then a 400)
CACHE_BYTES = 256 * 1024**2  # compiled grammars kept for reuse (per process)
SERIALIZED_BYTES = 64 * 1024**2  # serialized grammars the HTTP side keeps for the scheduler process
BATCH_FILL_MIN = 4  # constrained rows from which one step's masks are filled by xgrammar's thread pool
_batch = None  # that pool (xgrammar.BatchGrammarMatcher), made on first use


def _xgr():
    from ..extras import MissingDependency, optional_import

    try:
        return optional_import("xgrammar", "serve", feature="structured output")
    except MissingDependency as e:  # an optional dependency of the serve extra
        raise RuntimeError(str(e)) from e


def bitmask_words(vocab_size: int) -> int:
    """int32 words of one row of a token bitmask."""
    return (vocab_size + 31) // 32


class Grammars:
    """Compiles grammars for one tokenizer and vocabulary (``vocab_size``: the model's logits, which may be
    larger than the tokenizer's; the extra ids are never allowed). ``eos_token_id`` ends every grammar."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, timeout: float = COMPILE_TIMEOUT,
                 cache_bytes: int = CACHE_BYTES):
        xgr = _xgr()
        from transformers import PreTrainedTokenizerFast  # xgrammar reads the vocabulary through transformers

        stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else None
        self.info = xgr.TokenizerInfo.from_huggingface(PreTrainedTokenizerFast(tokenizer_object=tokenizer.tok),
                                                       vocab_size=vocab_size, stop_token_ids=stops)
        self.vocab_size, self.timeout = vocab_size, timeout
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=True,
                                            cache_limit_bytes=cache_bytes)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="fastxlstm-grammar")
        self._info_json: str | None = None
        self._serialized = _LRU(SERIALIZED_BYTES)  # GrammarSpec -> its SerializedGrammar

    def compile(self, spec: GrammarSpec):
        """The compiled grammar of ``spec`` (blocking; raises :class:`StructuredError` when it is invalid)."""
        c = self.compiler
        try:  # (the compiler is thread-safe)
            if spec.kind == "json":
                return c.compile_json_schema(spec.source, any_whitespace=False)
            if spec.kind == "json_object":
                return c.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if spec.kind == "regex":
                return c.compile_regex(spec.source)
            if spec.kind == "choice":  # JSON string literals are EBNF string literals
                return c.compile_grammar("root ::= " + " | ".join(json.dumps(x) for x in json.loads(spec.source)))
            return c.compile_grammar(spec.source)
        except (RuntimeError, ValueError, TypeError) as e:
            raise StructuredError(f"the {spec.kind} constraint does not compile: {str(e).strip()[:300]}",
                                  "response_format" if spec.kind in ("json", "json_object") else "guided") from None

    def serialized(self, spec: GrammarSpec) -> SerializedGrammar:
        """``spec`` compiled, as plain text for the scheduler process (blocking; memoised per spec)."""
        out = self._serialized.get(spec)
        if out is None:
            compiled = self.compile(spec)
            if self._info_json is None:
                self._info_json = self.info.serialize_json()
            out = SerializedGrammar(compiled.serialize_json(), self._info_json)
            self._serialized.put(spec, out, len(out.compiled))
        return out

    async def compile_async(self, spec: GrammarSpec, serialized: bool = False):
        """:meth:`compile` (with ``serialized``, :meth:`serialized`) in the grammar thread, given up on after
        ``timeout`` s (a :class:`StructuredError`; the compile itself is bounded by the spec's size limits and
        finishes in the background)."""
        fut = asyncio.get_running_loop().run_in_executor(self.pool, self.serialized if serialized else self.compile,
                                                         spec)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), self.timeout)
        except asyncio.TimeoutError:
            raise StructuredError(f"the {spec.kind} constraint took more than {self.timeout:g} s to compile",
                                  "response_format") from None

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False)


@dataclass(frozen=True)
class SerializedGrammar:
    """A compiled grammar on its way to the scheduler process: xgrammar's JSON of it (``compiled``) and of the
    tokenizer's vocabulary (``info``: one string object for all of a server's grammars, sent once per worker)."""

    compiled: str
    info: str


class _LRU:
    """A dict bounded by the sizes its entries are put with (least recently used out first; thread-safe)."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.nbytes = max_bytes, 0
        self.items: OrderedDict = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key):
        with self.lock:
            item = self.items.get(key)
            if item is None:
                return None
            self.items.move_to_end(key)
            return item[0]

    def put(self, key, value, nbytes: int) -> None:
        with self.lock:
            old = self.items.pop(key, None)
            self.nbytes += nbytes - (old[1] if old else 0)
            self.items[key] = (value, nbytes)
            while self.nbytes > self.max_bytes and len(self.items) > 1:
                _, (_, n) = self.items.popitem(last=False)
                self.nbytes -= n


class GrammarStore:
    """The scheduler process's grammars: the tokenizer info it was sent (:meth:`set_info`) and the compiled
    grammars of the :class:`SerializedGrammar` texts it gets, deserialized once per distinct text (an LRU of
    ``cache_bytes`` of compiled grammars)."""

    def __init__(self, cache_bytes: int = CACHE_BYTES):
        self.info = None
        self._compiled = _LRU(cache_bytes)

    def set_info(self, info_json: str) -> None:
        self.info = _xgr().TokenizerInfo.deserialize_json(info_json)
        self._compiled = _LRU(self._compiled.max_bytes)  # grammars are tied to their vocabulary

    def load(self, compiled_json: str):
        """The compiled grammar of ``compiled_json`` (raises RuntimeError before :meth:`set_info`, ValueError
        when the text is no compiled grammar of that vocabulary)."""
        if self.info is None:
            raise RuntimeError("a grammar came before the tokenizer info")
        compiled = self._compiled.get(compiled_json)
        if compiled is None:
            try:
                compiled = _xgr().CompiledGrammar.deserialize_json(compiled_json, self.info)
            except (RuntimeError, ValueError, TypeError) as e:  # xgrammar's DeserializeError is a RuntimeError
                raise ValueError(f"the grammar does not deserialize: {str(e).strip()[:200]}") from None
            self._compiled.put(compiled_json, compiled, compiled.memory_size_bytes)
        return compiled


class Matcher:
    """One sequence's position in its grammar."""

    __slots__ = ("m",)

    def __init__(self, compiled):
        self.m = _xgr().GrammarMatcher(compiled)

    def accept(self, token: int) -> bool:
        """Advance past ``token``; False if the grammar does not allow it (or is already finished)."""
        return not self.m.is_terminated() and self.m.accept_token(int(token))

    def fill(self, bitmask: Tensor, row: int) -> None:
        """Write the allowed next tokens into row ``row`` of the int32 CPU ``bitmask``."""
        self.m.fill_next_token_bitmask(bitmask, row)

    @property
    def done(self) -> bool:
        return self.m.is_terminated()


def new_bitmask(rows: int, vocab_size: int) -> Tensor:
    """A fresh int32 CPU bitmask, every token allowed. (Pageable on purpose: its upload copies it before
    returning, so no copy still queued on the device can read a buffer the next step refills.)"""
    return torch.full((rows, bitmask_words(vocab_size)), -1, dtype=torch.int32)


def upload_masks(backend, choices) -> None:
    """Fill the next-token bitmask of every choice (scheduler ``Choice``) that follows a grammar and hand them
    to the backend's sampler (one upload); choices without one are left alone."""
    ruled = [c for c in choices if c.matcher is not None and c.slot is not None]
    if not ruled:
        return
    words = new_bitmask(len(ruled), backend.vocab_size)
    if len(ruled) >= BATCH_FILL_MIN:  # xgrammar's threads fill the rows in parallel, without the GIL
        global _batch
        if _batch is None:
            _batch = _xgr().BatchGrammarMatcher(max_threads="auto")
        _batch.batch_fill_next_token_bitmask([c.matcher.m for c in ruled], words)
    else:
        for row, c in enumerate(ruled):
            c.matcher.fill(words, row)
    backend.set_masks([c.slot for c in ruled], words)


__all__ = ["COMPILE_TIMEOUT", "GrammarStore", "Grammars", "Matcher", "SerializedGrammar", "bitmask_words",
           "new_bitmask", "upload_masks"]
