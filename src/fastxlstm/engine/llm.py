"""``LLM``: the Python API over :class:`~fastxlstm.engine.Engine` (strings or token ids in, results out)."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..devices import parse_dtype, resolve_device
from ..model import XLSTMForCausalLM
from ..ops.quant import parse_quantization
from ..sampling import SamplingParams
from ..state import clone_state
from ..text import StopText
from .engine import Engine
from .speculative import NgramIndex, SpeculativeConfig
from .state import SequenceState

Prompt = str | Sequence[int] | SequenceState


@dataclass
class GenerationResult:
    """One request's output: generated ``token_ids`` only (the stop / EOS token included when it
    ended the sequence), ``text`` (without stop strings and special tokens), ``finish_reason``
    ``"stop"`` (EOS, stop token or stop string) or ``"length"``, the ``state`` to continue
    from when ``return_state`` was asked for, and with ``logprobs`` asked for, each token's
    log-probability and its top alternatives ``[(token_id, logprob), ...]``."""

    token_ids: list[int]
    text: str
    finish_reason: str
    prompt_token_ids: list[int] = field(default_factory=list)
    state: SequenceState | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    num_spec_steps: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0


@dataclass
class _Request:
    index: int
    prompt_ids: list[int]
    start: SequenceState | None
    params: SamplingParams
    text: StopText
    stop_ids: set[int]
    want_state: bool
    slot: int = -1
    out: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None
    ngram: NgramIndex | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


def load_draft_model(spec: SpeculativeConfig, tokenizer, target: XLSTMForCausalLM) -> XLSTMForCausalLM:
    """The draft model of ``spec`` (method ``"draft"``) on the target's device and in its dtype; a directory's
    tokenizer must equal the target's ``tokenizer`` (same vocabulary; None: only the vocabulary sizes are
    compared, by the engine). ``LLM`` and the server load it with this."""
    if isinstance(spec.model, XLSTMForCausalLM):
        return spec.model
    check_draft_tokenizer(spec, tokenizer)
    from ..checkpoint import load_model_and_tokenizer

    draft, _ = load_model_and_tokenizer(spec.model, device=target.device, dtype=target.dtype, weight_mode="fused")
    return draft


def check_draft_tokenizer(spec: SpeculativeConfig | None, tokenizer) -> None:
    """ValueError where ``spec``'s draft model is a directory (or hub id) whose tokenizer differs from the
    target's ``tokenizer`` (None, or a ``random:`` / in-memory draft model: nothing to compare); read before any
    weights load (``fastxlstm serve --scheduler-process`` checks here, its worker loads the model)."""
    if spec is None or spec.method != "draft" or isinstance(spec.model, XLSTMForCausalLM):
        return
    if not isinstance(spec.model, (str, os.PathLike)):
        raise ValueError(f"speculative_config model must be a path, hub id or random:<preset>, got {spec.model!r}")
    if tokenizer is None or str(spec.model).startswith("random:"):
        return
    from ..checkpoint import resolve_model_dir
    from ..tokenizer import Tokenizer

    if Tokenizer.from_dir(resolve_model_dir(spec.model)).tok.get_vocab() != tokenizer.tok.get_vocab():
        raise ValueError(f"the draft model {spec.model} has a different tokenizer than the target (speculative "
                         "decoding needs the same vocabulary)")


class PlainWindows:
    """How many plain decode steps run between two reads while the n-gram drafter has no draft for any running
    sequence (``LLM`` and the server): 1 after a read that found drafts, doubling with each further read without
    any, at most ``cap`` (``min(steps per read, k)``: a repeat that starts inside a window is found at most ``k``
    tokens late, the tokens of one speculative step). So a batch that repeats itself is looked up after every
    token, and one that does not decodes several steps per read, without the verification of ``k + 1`` positions
    a speculative step without drafts would cost."""

    def __init__(self, cap: int):
        self.cap, self.steps, self._next = max(1, cap), 1, 1

    def drafted(self, found: bool) -> None:
        """Record a read's lookup: ``steps`` is then the window to run if it found nothing."""
        self.steps = 1 if found else self._next
        self._next = 1 if found else min(2 * self.steps, self.cap)


class LLM:
    """Fast xLSTM generation on one device.

    ``LLM(path_or_repo_id_or_model, device=None, dtype=None, max_slots=8)``; ``dtype`` a ``torch.dtype`` or
    ``"auto"`` (None: bfloat16 on CUDA, float32 on the CPU), ``"half"``, ``"bfloat16"``, ``"float16"``,
    ``"float32"`` (:func:`fastxlstm.devices.parse_dtype`, the CLI's ``--dtype``); ``random:<preset>``
    builds a randomly initialised model (benchmarks). ``quantization="fp8"|"int8"`` quantizes the blocks'
    weights (:func:`fastxlstm.load`; a given model is quantized in place). ``adapter=DIR`` merges a PEFT LoRA
    adapter into the weights as they load (:func:`fastxlstm.load`; base speed). See :meth:`generate`, :meth:`stream`,
    :meth:`prefill`; :attr:`engine` is the slot-level engine underneath."""

    def __init__(
        self, model: str | os.PathLike | XLSTMForCausalLM, tokenizer=None, *, device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None, max_slots: int = 8, use_cuda_graph: bool | None = None,
        prefill_chunk_size: int = 4096, backend: str = "auto", sync_every: int = 16,
        state_dtype: str | torch.dtype | None = None, quantization: str | None = None,
        speculative_config: SpeculativeConfig | dict | str | None = None,
        adapter: str | os.PathLike | None = None,
    ):
        dtype, quantization = parse_dtype(dtype), parse_quantization(quantization)
        if isinstance(model, XLSTMForCausalLM):
            if adapter is not None:
                raise ValueError("adapter= needs the base model's path (it is merged while loading); for a model "
                                 "object, load it with fastxlstm.load(path, adapter=DIR)")
            net = model
            if device is not None or dtype is not None:
                net = net.to(device=None if device is None else resolve_device(device), dtype=dtype)
            if quantization is not None:
                from ..model.quant import quantize_model

                net = quantize_model(net, quantization)
        else:
            from ..checkpoint import load_model_and_tokenizer

            net, tok = load_model_and_tokenizer(model, device=device, dtype=dtype, weight_mode="fused",
                                                quantization=quantization, adapter=adapter)
            tokenizer = tokenizer if tokenizer is not None else tok
        self.model = net
        self.tokenizer = tokenizer
        self.speculative_config = spec = SpeculativeConfig.parse(speculative_config)
        draft = load_draft_model(spec, tokenizer, net) if spec is not None and spec.method == "draft" else None
        eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
        self.engine = Engine(net, max_slots=max_slots, use_cuda_graph=use_cuda_graph,
                             prefill_chunk_size=prefill_chunk_size, backend=backend, state_dtype=state_dtype,
                             eos_token_id=eos if eos is not None else net.config.eos_token_id,
                             speculative=spec, draft_model=draft)
        if sync_every <= 0:
            raise ValueError(f"sync_every must be positive, got {sync_every}")
        self.sync_every = min(sync_every, self.engine.history)

    # ------------------------------------------------------------------ tokens
    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this LLM has no tokenizer: pass prompts as lists of token ids")
        ids = self.tokenizer.encode(text)
        if not ids:
            raise ValueError(f"prompt {text!r} encodes to no tokens")
        return ids

    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.encode(prompt) if prompt else []
        return [int(t) for t in prompt]

    # -------------------------------------------------------------- requests
    @staticmethod
    def _is_single(prompts) -> bool:
        if isinstance(prompts, (str, SequenceState)):
            return True
        if isinstance(prompts, torch.Tensor):
            return prompts.ndim == 1
        return len(prompts) > 0 and all(isinstance(t, int) for t in prompts)

    def _requests(self, prompts, state, params: Sequence[SamplingParams], want_state: bool) -> list[_Request]:
        if isinstance(prompts, torch.Tensor):
            prompts = prompts.tolist()
        items = [prompts] if self._is_single(prompts) else list(prompts)
        if not items:
            raise ValueError("no prompts given")
        states = state if isinstance(state, (list, tuple)) else [state] * len(items)
        if len(states) != len(items):
            raise ValueError(f"{len(items)} prompts but {len(states)} states")
        if len(params) == 1:
            params = list(params) * len(items)
        if len(params) != len(items):
            raise ValueError(f"{len(items)} prompts but {len(params)} sampling params")
        reqs = []
        for idx, (item, st, p) in enumerate(zip(items, states, params)):
            if isinstance(item, SequenceState):
                st, item = item, []
            ids = self._prompt_ids(item)
            if st is None and not ids:
                raise ValueError(f"prompt {idx} is empty: at least one token is needed")
            if p.stop and self.tokenizer is None:
                raise ValueError("stop strings need a tokenizer")
            p.check_vocab(self.engine.vocab_size)
            if st is not None:
                self._check_state(st, idx)
            stop_ids = set(p.stop_token_ids)
            if not p.ignore_eos and self.engine.eos_token_id is not None:
                stop_ids.add(int(self.engine.eos_token_id))
            reqs.append(_Request(idx, ids, st, p, StopText(self.tokenizer, p.stop), stop_ids, want_state))
        return reqs

    def _check_state(self, st: SequenceState, idx: int) -> None:
        """A clear error for a saved state that does not fit this model (before it reaches the device)."""
        vocab = self.engine.vocab_size
        toks = list(st.token_ids) + ([] if st.pending_token is None else [st.pending_token])
        bad = [t for t in toks if not 0 <= int(t) < vocab]
        if bad:
            raise ValueError(f"state {idx}: token id {bad[0]} is out of range for vocab_size {vocab}")
        self.engine._as_state(st.layers)  # layer count and shapes
        if st.logits is not None and tuple(st.logits.shape) != (vocab,):
            raise ValueError(f"state {idx}: logits have shape {tuple(st.logits.shape)}, expected ({vocab},)")

    @staticmethod
    def _params(sampling_params, **kw) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams(**kw)]
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params]
        return list(sampling_params)

    # ------------------------------------------------------------------ running
    def _admit(self, reqs: list[_Request]) -> None:
        eng = self.engine
        plain = [r for r in reqs if r.start is None or r.prompt_ids or r.start.pending_token is not None]
        cont_logits = [r for r in reqs if r not in plain]
        if plain:
            ids, states, hists = [], [], []
            for r in plain:
                if r.start is None:
                    ids.append(r.prompt_ids)
                    states.append(None)
                    hists.append(())
                else:
                    lead = [r.start.pending_token] if r.start.pending_token is not None else []
                    ids.append(lead + r.prompt_ids)
                    states.append(r.start.layers)
                    hists.append(r.start.token_ids[:len(r.start.token_ids) - len(lead)])
            pend_only = [r for r in plain if r.start is not None and not r.prompt_ids]
            # A pending token alone continues through the decode path (same arithmetic as an
            # uninterrupted run); everything else is prefilled.
            pre = [r for r in plain if r not in pend_only]
            if pre:
                idx = [plain.index(r) for r in pre]
                logits = eng.prefill_into_slots([r.slot for r in pre], [ids[i] for i in idx],
                                                [states[i] for i in idx], [r.params for r in pre],
                                                [hists[i] for i in idx],
                                                [r.start.rng_counter if r.start is not None else 0 for r in pre])
                self._first_tokens(pre, logits)
            for r in pend_only:
                eng.set_slot_state(r.slot, r.start.layers)
                eng.configure_slot(r.slot, r.params, r.start.token_ids, counter=r.start.rng_counter)
                if r.params.max_new_tokens > 0:
                    eng.start_from_token(r.slot, r.start.pending_token)
                else:
                    r.finish_reason = "length"
        for r in cont_logits:
            eng.set_slot_state(r.slot, r.start.layers)
            eng.configure_slot(r.slot, r.params, r.start.token_ids, counter=r.start.rng_counter)
            self._first_tokens([r], r.start.logits.to(eng.device).float()[None])
        spec = self.speculative_config
        if spec is not None:
            for r in reqs:  # the drafter's view of the sequence: everything before the pending token
                base = (list(r.start.token_ids) if r.start is not None else []) + r.prompt_ids
                pending_only = r.start is not None and not r.prompt_ids and r.start.pending_token is not None
                eng.prefill_draft(r.slot, base[:-1] if pending_only else base)
                if spec.method == "ngram":
                    r.ngram = NgramIndex(spec.prompt_lookup_min, spec.prompt_lookup_max)
                    r.ngram.extend(base)

    def _first_tokens(self, reqs: list[_Request], logits: torch.Tensor) -> None:
        go = [j for j, r in enumerate(reqs) if r.params.max_new_tokens > 0]
        for r in reqs:
            if r.params.max_new_tokens == 0:
                r.finish_reason = "length"
        if go:
            self.engine.sample([reqs[j].slot for j in go], logits[go])

    def _consume(self, r: _Request, rd) -> None:
        new, finished = rd.new_tokens, rd.finished
        for i, tok in enumerate(new):
            if r.done:
                break
            r.out.append(tok)
            if rd.logprobs is not None:
                r.logprobs.append(rd.logprobs[i])
                r.top_logprobs.append(rd.top_logprobs[i])
            if tok in r.stop_ids:
                r.finish_reason = "stop"
            elif r.text.add(tok):
                r.finish_reason = "stop"
            elif len(r.out) >= r.params.max_new_tokens:
                r.finish_reason = "length"
        if finished and not r.done:
            r.finish_reason = "length" if len(r.out) >= r.params.max_new_tokens else "stop"

    def _finish(self, r: _Request) -> GenerationResult:
        eng = self.engine
        r.text.finish()
        state = None
        if r.want_state and r.slot >= 0 and r.out:
            base = (r.start.token_ids if r.start is not None else []) + r.prompt_ids
            state = SequenceState(clone_state(eng.get_slot_state(r.slot)), base + r.out, pending_token=r.out[-1],
                                  rng_counter=(r.start.rng_counter if r.start else 0) + len(r.out))
        counts = (0, 0, 0)
        if r.slot >= 0:
            counts = eng.spec_counts(r.slot)
            eng.free_slot(r.slot)
            r.slot = -1
        lp = r.params.logprobs is not None
        return GenerationResult(list(r.out), r.text.text, r.finish_reason or "length", r.prompt_ids, state,
                                list(r.logprobs) if lp else None, list(r.top_logprobs) if lp else None, *counts)

    def _run(self, reqs: list[_Request], sync_every: int, speculate: bool = True) -> Iterator[_Request]:
        """Continuous batching over the engine's slots; yields each request whenever it got new
        tokens (for streaming) and when it finishes. With a speculative config (and ``speculate``): the n-gram
        drafter proposes from the tokens read after each step, one speculative step at a time, and when no
        running row has a draft plain decode steps run instead (:class:`PlainWindows`); the draft model drafts
        on the device (every step speculative, several between reads)."""
        eng = self.engine
        spec = self.speculative_config if speculate else None
        idle = PlainWindows(min(sync_every, spec.num_speculative_tokens) if spec is not None else 1)
        waiting = deque(reqs)
        running: dict[int, _Request] = {}
        try:
            while waiting or running:
                admit = []
                while waiting and eng.free_slots:
                    r = waiting.popleft()
                    r.slot = eng.allocate_slot()
                    admit.append(r)
                if admit:
                    self._admit(admit)
                    for r in admit:
                        running[r.slot] = r
                else:
                    drafts = None
                    if spec is not None and spec.method == "ngram":
                        k = spec.num_speculative_tokens
                        drafts = {s: d for s, r in running.items() if not r.done and (d := r.ngram.propose(k))}
                        idle.drafted(bool(drafts))
                    if drafts:  # one step: the next drafts need its tokens
                        eng.spec_step(drafts)
                    else:
                        budget = max(r.params.max_new_tokens - len(r.out) for r in running.values())
                        steps = max(1, min(sync_every, budget))
                        draft = spec is not None and spec.method == "draft"
                        if draft:  # at most k+1 tokens a step must fit the sampler's history buffer
                            steps = max(1, min(steps, eng.history // (spec.num_speculative_tokens + 1)))
                        elif spec is not None:  # n-gram, no row has a draft: plain steps
                            steps = min(steps, idle.steps)
                        for _ in range(steps):
                            if draft:
                                eng.spec_step()
                            else:
                                eng.decode_step(return_outputs=False)
                reads = eng.read_tokens([s for s, r in running.items() if not r.done])
                for rd in reads:
                    r = running[rd.slot]
                    if r.ngram is not None:
                        r.ngram.extend(rd.new_tokens)
                    self._consume(r, rd)
                for slot in list(running):
                    r = running[slot]
                    yield r
                    if r.done:
                        del running[slot]
        finally:  # a failure (or an abandoned stream) must not leak slots: every later call would fail
            for r in reqs:
                if r.slot >= 0:
                    eng.free_slot(r.slot)
                    r.slot = -1

    # ---------------------------------------------------------------------- API
    @torch.no_grad()
    def generate(
        self, prompts: Prompt | Sequence[Prompt], max_new_tokens: int = 64, temperature: float = 0.0,
        top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0, repetition_penalty: float = 1.0,
        stop: str | list[str] | None = None, stop_token_ids: list[int] | None = None, ignore_eos: bool = False,
        seed: int | None = None, *, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
        logit_bias: dict[int, float] | None = None, logprobs: int | None = None,
        state: SequenceState | Sequence[SequenceState | None] | None = None,
        return_state: bool = False, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[GenerationResult]:
        """Generate for one prompt or many (strings, token-id lists, or :class:`SequenceState`
        to continue). Returns one :class:`GenerationResult` per prompt, in order. Prompts run
        as a continuous batch over the engine's slots; each prompt is prefilled on its own
        (or with prompts of equal length), so results equal those of each prompt alone.
        ``state`` (one or one per prompt) continues a saved sequence with the prompt appended. The
        keyword arguments are the fields of :class:`~fastxlstm.sampling.SamplingParams` (or pass
        ``sampling_params``, one or one per prompt)."""
        params = self._params(sampling_params, max_new_tokens=max_new_tokens, temperature=temperature,
                              top_p=top_p, top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty,
                              presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                              logit_bias=logit_bias or {}, logprobs=logprobs,
                              seed=seed, stop=stop or [], stop_token_ids=stop_token_ids or [],
                              ignore_eos=ignore_eos)
        reqs = self._requests(prompts, state, params, return_state)
        stops = any(r.params.stop for r in reqs)
        sync = 1 if (return_state and stops) else self.sync_every
        results: dict[int, GenerationResult] = {}
        # a stop string is found on the host, after the step that completed it: a speculative step may have
        # run past it, so a state asked for together with stop strings comes from plain decode steps
        for r in self._run(reqs, sync, speculate=not (return_state and stops)):
            if r.done and r.index not in results:
                results[r.index] = self._finish(r)
        return [results[i] for i in range(len(reqs))]

    @torch.no_grad()
    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None, *,
               state: SequenceState | None = None, return_state: bool = False,
               **kwargs) -> Generator[str, None, GenerationResult]:
        """Yield the generated text piece by piece (stop strings never appear); the generator's return
        value (``StopIteration.value``) is the :class:`GenerationResult` (with the state to continue from when
        ``return_state``, as :meth:`generate`). ``kwargs`` are the fields of
        :class:`~fastxlstm.sampling.SamplingParams` (or pass ``sampling_params``)."""
        if not self._is_single(prompt):
            raise ValueError("stream takes one prompt")
        if self.tokenizer is None:
            raise ValueError("stream needs a tokenizer (use generate with token ids instead)")
        if sampling_params is not None and kwargs:
            raise ValueError("pass sampling_params or sampling keyword arguments, not both")
        params = [sampling_params if sampling_params is not None else SamplingParams(**kwargs)]
        (req,) = self._requests(prompt, state, params, return_state)
        gen = self._run([req], 1)
        try:
            for r in gen:
                if r.done:
                    result = self._finish(r)
                piece = r.text.ready(final=r.done)
                if piece:
                    yield piece
                if r.done:
                    return result
        finally:
            gen.close()  # frees the slot
        raise AssertionError("unreachable: a request always finishes")

    @torch.no_grad()
    def prefill(self, prompt: str | Sequence[int], state: SequenceState | None = None) -> SequenceState:
        """Run a prompt (after ``state`` if given) and return the state to continue from
        (``llm.generate(state)``, or ``state.save(path)`` / ``SequenceState.load(path)``)."""
        ids = self._prompt_ids(prompt)
        if not ids and state is None:
            raise ValueError("empty prompt: at least one token is needed")
        eng = self.engine
        slot = eng.allocate_slot()
        try:
            if state is None:
                logits = eng.prefill_into_slot(slot, ids)
                counter = 0
            else:
                lead = [state.pending_token] if state.pending_token is not None else []
                if not lead and not ids:
                    return state
                logits = eng.prefill_into_slot(slot, lead + ids, state=state.layers)
                counter = state.rng_counter
            layers = eng.get_slot_state(slot)
        finally:
            eng.free_slot(slot)
        history = list(state.token_ids) if state is not None else []
        return SequenceState(layers, history + ids, logits=logits[0] if logits.ndim == 2 else logits,
                             rng_counter=counter)
