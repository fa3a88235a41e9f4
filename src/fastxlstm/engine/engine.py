"""Slot-based inference engine: exact per-sequence prefill, batched CUDA-graph decode."""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..model import XLSTMForCausalLM
from ..sampling import SamplingParams
from ..state import PackedState, State
from .cuda_graph import capture_graph
from .prefill_graph import PrefillGraphs
from .runner import Runner
from .sampler import SlotRead, SlotSampler
from .transfer import to_device

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 160, 192, 224, 256)
STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_state_dtype(value: str | torch.dtype | None) -> torch.dtype:
    """The storage dtype of the decode state's ``C`` (a config's ``inference_state_dtype``):
    ``"float32"`` (default) or ``"bfloat16"`` (half the state traffic; math stays float32)."""
    if value is None:
        return torch.float32
    if isinstance(value, torch.dtype):
        if value in STATE_DTYPES.values():
            return value
    elif str(value) in STATE_DTYPES:
        return STATE_DTYPES[str(value)]
    raise ValueError(f"state dtype must be one of {sorted(STATE_DTYPES)}, got {value!r}")


@dataclass
class DecodeOutput:
    """Result of :meth:`Engine.decode_step` for the requested slots (device tensors, no host sync).

    ``tokens [n]`` are the sampled next tokens; ``finished [n]`` is True where the sequence
    stopped on this step (EOS / stop token id / max_new_tokens); ``logits [n, V]`` (float32,
    after soft-capping, before penalties) only when asked for; where some slot's parameters ask for
    logprobs, ``logprobs [n]`` of the tokens and the top alternatives ``top_logprobs`` / ``top_ids``
    ``[n, MAX_LOGPROBS]`` (the model's log-softmax; rows of other slots hold stale values)."""

    slots: list[int]
    tokens: Tensor
    finished: Tensor
    logits: Tensor | None = None
    logprobs: Tensor | None = None
    top_logprobs: Tensor | None = None
    top_ids: Tensor | None = None


class Engine:
    """Fixed number of sequence slots over one model (see the package docstring for the API)."""

    def __init__(
        self, model: XLSTMForCausalLM, max_slots: int = 8, *, use_cuda_graph: bool | None = None,
        prefill_chunk_size: int = 4096, backend: str = "auto", batch_buckets: Sequence[int] | None = None,
        eos_token_id: int | None = None, history: int = 256, state_dtype: str | torch.dtype | None = None,
        prefill_graphs: bool | None = None, speculative=None, draft_model: XLSTMForCausalLM | None = None,
    ):
        if max_slots <= 0:
            raise ValueError(f"max_slots must be positive, got {max_slots}")
        model.eval()
        self.model = model
        self.config = cfg = model.config
        self.runner = Runner(model, backend=backend, chunk_size=prefill_chunk_size)
        self.device = dev = model.device
        self.max_slots = n = max_slots
        self.vocab_size = cfg.vocab_size
        self.eos_token_id = cfg.eos_token_id if eos_token_id is None else eos_token_id
        self.use_cuda_graph = (dev.type == "cuda") if use_cuda_graph is None else use_cuda_graph
        if self.use_cuda_graph and dev.type != "cuda":
            raise ValueError("use_cuda_graph=True needs the model on a CUDA device")
        if prefill_graphs if prefill_graphs is not None else self.use_cuda_graph:
            if dev.type != "cuda":
                raise ValueError("prefill_graphs=True needs the model on a CUDA device")
            self.runner.prefill_graphs = PrefillGraphs(self.runner)
        buckets = sorted({b for b in (batch_buckets or DEFAULT_BUCKETS) if b < n} | {n})
        self.buckets = buckets
        nh, dqk, dv = cfg.num_heads, cfg.qk_head_dim, cfg.v_head_dim
        f32 = dict(device=dev, dtype=torch.float32)
        self.state_dtype = resolve_state_dtype(
            state_dtype if state_dtype is not None else getattr(cfg, "inference_state_dtype", None))
        # Recurrent state, one row per slot: C in state_dtype (float32 math either way), n and m float32.
        self.states: list[State] = [
            (torch.zeros(n, nh, dqk, dv, device=dev, dtype=self.state_dtype), torch.zeros(n, nh, dqk, **f32),
             torch.zeros(n, nh, **f32))
            for _ in range(cfg.num_blocks)
        ]
        # each slot's row of every state tensor, [1, numel] views in FlatState order (a packed load makes none)
        self._rows = list(zip(*(t.view(n, -1).split(1) for layer in self.states for t in layer)))
        # Per-slot sampling parameters, next inputs, stop conditions and sampled-token ring buffers.
        self.sampler = SlotSampler(n, cfg.vocab_size, dev, history, self.eos_token_id)
        self.history = history
        self.tokens, self.active = self.sampler.tokens, self.sampler.active
        # Host-side bookkeeping.
        self._free = list(range(n))
        self._running: set[int] = set()
        # (bucket, mode) -> (graph, its logits, the captured function). The function is kept alive
        # because the graph reads tensors it owns (e.g. the row indices) on every replay.
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Tensor, object]] = {}
        self._pool = None
        self._init_speculative(speculative, draft_model, backend, prefill_chunk_size)

    def _init_speculative(self, config, draft_model, backend: str, chunk_size: int) -> None:
        from .speculative import Speculation, SpeculativeConfig

        config = SpeculativeConfig.parse(config)
        if config is None and draft_model is not None:
            raise ValueError("draft_model given without a speculative config")
        self.spec = None if config is None else Speculation(self, config, draft_model, backend, chunk_size)

    def enable_speculation(self, config, draft_model: XLSTMForCausalLM | None = None) -> None:
        """Speculative decoding for an engine built without it (``Engine(speculative=...)`` alike; the server
        turns it on after its warm-up)."""
        if self.spec is not None:
            raise RuntimeError("this engine already has a speculative config")
        self._init_speculative(config, draft_model, self.runner.backend, self.runner.chunk_size)

    # ------------------------------------------------------------------------ slots
    @property
    def free_slots(self) -> int:
        return len(self._free)

    def allocate_slot(self) -> int:
        """The lowest free slot (slots are reused lowest-first, which keeps decode buckets small)."""
        if not self._free:
            raise RuntimeError(f"all {self.max_slots} slots are in use")
        return heapq.heappop(self._free)

    def free_slot(self, slot: int) -> None:
        """Release ``slot`` (it stops decoding; its state is overwritten by the next prefill)."""
        self._check_slot(slot)
        if slot in self._free:
            raise ValueError(f"slot {slot} is not allocated")
        self.sampler.release(slot)
        self._running.discard(slot)
        heapq.heappush(self._free, slot)

    def _check_slot(self, slot: int) -> None:
        if not 0 <= int(slot) < self.max_slots:
            raise IndexError(f"slot {slot} out of range [0, {self.max_slots})")

    def _check_allocated(self, slot: int) -> None:
        self._check_slot(slot)
        if slot in self._free:
            raise ValueError(f"slot {slot} is not allocated (call allocate_slot first)")

    def _long(self, values: Sequence[int]) -> Tensor:
        """``values`` as an int64 device tensor, copied without waiting for queued GPU work."""
        return to_device(values, self.device)

    # ---------------------------------------------------------------------- prefill
    def _ids(self, token_ids: Sequence[int] | Tensor) -> Tensor:
        ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
        if ids.numel() == 0:
            raise ValueError("empty prompt: at least one token id is needed")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.vocab_size:
            raise ValueError(f"token id {lo if lo < 0 else hi} is out of range for vocab_size {self.vocab_size}")
        return to_device(ids, self.device)

    @torch.no_grad()
    def prefill_into_slot(self, slot: int, token_ids: Sequence[int] | Tensor, state: list[State] | None = None,
                          params: SamplingParams | None = None, history: Sequence[int] = ()) -> Tensor:
        """Run ``token_ids`` (continuing ``state`` if given) and store the final state in ``slot``.

        Returns the float32 logits ``[V]`` for the next token. ``params`` configures the slot's
        sampling (default greedy); ``history`` are earlier tokens of the sequence (for the
        repetition penalty) when continuing a state."""
        return self.prefill_into_slots([slot], [token_ids], None if state is None else [state], [params],
                                       [history])[0]

    @torch.no_grad()
    def prefill_into_slots(
        self, slots: Sequence[int], token_ids: Sequence[Sequence[int] | Tensor],
        states: Sequence[list[State] | None] | None = None, params: Sequence[SamplingParams | None] | None = None,
        histories: Sequence[Sequence[int]] | None = None, counters: Sequence[int] | None = None,
    ) -> Tensor:
        """Prefill several slots; prompts of equal length without a start state share one forward
        (no padding ever: every row of a forward is a full prompt). ``counters``: each slot's RNG
        position (tokens sampled before, when continuing a state; default 0). Returns logits ``[n, V]``."""
        n = len(slots)
        if len(token_ids) != n:
            raise ValueError(f"{n} slots but {len(token_ids)} prompts")
        states = list(states) if states is not None else [None] * n
        params = list(params) if params is not None else [None] * n
        histories = list(histories) if histories is not None else [()] * n
        counters = list(counters) if counters is not None else [0] * n
        for s in slots:
            self._check_allocated(s)
        if len(set(slots)) != n:
            raise ValueError("slots must be distinct")
        ids = [self._ids(t) for t in token_ids]
        logits = torch.empty(n, self.vocab_size, device=self.device)
        groups: dict[object, list[int]] = {}
        for j in range(n):
            key = ("len", ids[j].numel()) if states[j] is None else ("state", j)
            groups.setdefault(key, []).append(j)
        for members in groups.values():
            start = states[members[0]]
            if start is not None:
                start = self._as_state(start)
            batch = torch.stack([ids[j] for j in members])
            hidden, new_state = self.runner.forward_tokens(batch, start)
            logits.index_copy_(0, self._long(members), self.runner.logits(hidden))  # (a list index would sync)
            self._store_states([slots[j] for j in members], new_state)
        for j, s in enumerate(slots):
            hist = self._long(list(histories[j]))
            self.configure_slot(s, params[j] or SamplingParams(), torch.cat([hist, ids[j]]), counters[j])
        return logits

    def _store_states(self, slots: list[int], state: list[State]) -> None:
        """Write the rows of ``state`` (leading dim ``len(slots)``) into the slots' state buffers: one
        multi-tensor copy for a single slot, else one ``index_copy_`` per tensor."""
        if len(slots) == 1:
            s = slots[0]
            dst = [t[s] for layer in self.states for t in layer]
            torch._foreach_copy_(dst, [t[0] for layer in state for t in layer])
            return
        rows = self._long(slots)
        for (c, nn_, m), (c1, n1, m1) in zip(self.states, state):
            c.index_copy_(0, rows, c1.to(c.dtype))
            nn_.index_copy_(0, rows, n1)
            m.index_copy_(0, rows, m1)

    def _as_state(self, state: list[State]) -> list[State]:
        cfg = self.config
        if len(state) != cfg.num_blocks:
            raise ValueError(f"state has {len(state)} layers, model has {cfg.num_blocks}")
        want = ((cfg.num_heads, cfg.qk_head_dim, cfg.v_head_dim), (cfg.num_heads, cfg.qk_head_dim),
                (cfg.num_heads,))
        if isinstance(state, PackedState) and state.fits(want, cfg.num_blocks, self.device):
            return state  # batch 1, float32, on the device: as it is (no per-tensor work)
        out = []
        for layer in state:
            ts = []
            for t, w in zip(layer, want):
                t = t.to(self.device, torch.float32)
                if t.ndim == len(w):
                    t = t[None]
                if tuple(t.shape) != (1, *w):
                    raise ValueError(f"state tensor has shape {tuple(t.shape)}, expected {(1, *w)}")
                ts.append(t)
            out.append(tuple(ts))
        return out

    # --------------------------------------------------------------------- sampling
    def configure_slot(self, slot: int, params: SamplingParams, history: Sequence[int] | Tensor = (),
                       counter: int = 0) -> None:
        """Set ``slot``'s sampling parameters and stop conditions; ``history`` (prompt and earlier
        output) feeds the repetition penalty; ``counter`` is the RNG position (tokens drawn so far)."""
        self._check_allocated(slot)
        self.sampler.configure(slot, params, history, counter)
        if self.spec is not None:
            self.spec.reset(slot)

    @torch.no_grad()
    def sample(self, slots: Sequence[int], logits: Tensor) -> Tensor:
        """Sample the first token of each slot from ``logits [n, V]`` (e.g. from prefill) with the
        slot's parameters; the token becomes the slot's next decode input and the slot starts
        decoding (unless that token already stopped it). Returns the tokens ``[n]`` (device); with
        logprobs asked for, :meth:`SlotSampler.last_logprobs` gives theirs."""
        slots = [int(s) for s in slots]
        for s in slots:
            self._check_allocated(s)
        if logits.shape != (len(slots), self.vocab_size):
            raise ValueError(f"logits must have shape {(len(slots), self.vocab_size)}, got {tuple(logits.shape)}")
        ridx = self._long(slots)
        act = torch.ones(len(slots), device=self.device, dtype=torch.bool)
        nxt = self.sampler.advance(ridx, logits.float(), self.sampler.mode(slots), act)
        self._running.update(slots)
        return nxt

    def start_from_token(self, slot: int, token: int) -> None:
        """Make ``token`` (already chosen, not yet run) the slot's next decode input and start
        decoding (continuing a saved state that ends with a pending token)."""
        self._check_allocated(slot)
        one = slice(slot, slot + 1)
        self.tokens[one].fill_(int(token))
        torch.gt(self.sampler.remaining[one], 0, out=self.active[one])
        self._running.add(slot)

    # ----------------------------------------------------------------------- decode
    def _bucket(self, slots) -> int:
        top = max(slots) + 1
        for b in self.buckets:
            if b >= top:
                return b
        return self.max_slots

    def _step_fn(self, bsz: int, mode: str):
        ridx = slice(0, bsz)
        views = [(c[:bsz], n[:bsz], m[:bsz]) for c, n, m in self.states]

        def fn() -> Tensor:
            act = self.active[:bsz].clone()
            logits = self.runner.decode(self.tokens[:bsz], views, act)
            self.sampler.advance(ridx, logits, mode, act)
            return logits

        return fn

    def _graph(self, bsz: int, mode: str, spec: bool = False) -> tuple[torch.cuda.CUDAGraph, Tensor]:
        key = (bsz, mode, spec)
        if key not in self._graphs:
            fn = self.spec.step_fn(bsz, mode) if spec else self._step_fn(bsz, mode)
            saved = self.active.clone()
            self.active.zero_()  # warm-up and capture must not advance any sequence
            graph, out = capture_graph(fn, warmup=2, pool=self._pool)
            if self._pool is None:
                self._pool = graph.pool()
            self.active.copy_(saved)
            self._graphs[key] = (graph, out, fn)
        return self._graphs[key][:2]

    def warmup(self, batch_sizes: Sequence[int] | None = None, modes: Sequence[str] = ("greedy",)) -> None:
        """Capture the CUDA graphs of the given batch buckets and sampler modes (``greedy``, ``sample``,
        ``sorted``, each optionally ``+lp``) ahead of time, the speculative step's too where the engine speculates
        (no-op on CPU)."""
        if not self.use_cuda_graph:
            return
        with torch.no_grad():
            for b in batch_sizes or self.buckets:
                for mode in modes:
                    for spec in (False, True) if self.spec is not None else (False,):
                        self._graph(self._bucket([b - 1]), mode, spec=spec)

    def _select(self, slots: Sequence[int] | None, tokens: Sequence[int] | Tensor | None = None
                ) -> tuple[list[int], Tensor | None]:
        """The slots a step advances and their indices on the device: None, the running ones as they are (no
        indices made); else exactly ``slots`` in their order (the others are made inactive), fed ``tokens``
        where given."""
        if slots is None:
            return sorted(self._running), None
        running = [int(s) for s in slots]
        for s in running:
            self._check_allocated(s)
        ridx = self._long(running)
        self.active.zero_()
        self.active.index_fill_(0, ridx, True)
        self._running = set(running)
        if tokens is not None:
            tok = to_device(tokens, self.device)
            if tok.shape != (len(running),):
                raise ValueError(f"tokens must have shape {(len(running),)}, got {tuple(tok.shape)}")
            self.tokens[ridx] = tok
        return running, ridx

    @torch.no_grad()
    def decode_step(self, slots: Sequence[int] | None = None, tokens: Sequence[int] | Tensor | None = None,
                    *, return_outputs: bool = True, return_logits: bool = False) -> DecodeOutput | None:
        """One decode step.

        ``slots``: the slots to advance (None: every slot still active on the device, the fast
        path that needs no host work). ``tokens``: their input tokens (None: each slot's last
        sampled token, already on the device). Slots outside ``slots`` are untouched. The step
        is one CUDA-graph replay per batch bucket; nothing waits for the GPU."""
        running, ridx = self._select(slots, tokens)
        if not running:
            return None
        bsz = self._bucket(running)
        mode = self.sampler.mode(running)
        if self.use_cuda_graph:
            graph, logits = self._graph(bsz, mode)
            graph.replay()
        else:
            logits = self._step_fn(bsz, mode)()
        if not return_outputs:
            return None
        ridx = ridx if ridx is not None else self._long(running)
        out = DecodeOutput(running, self.tokens[ridx], ~self.active[ridx], logits[ridx] if return_logits else None)
        if mode.endswith("+lp"):
            out.logprobs, out.top_logprobs, out.top_ids = self.sampler.last_logprobs(ridx)
        return out

    @torch.no_grad()
    def decode_steps(self, slots: Sequence[int], steps: int, *, logprobs: bool = False
                     ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
        """``steps`` decode steps of exactly ``slots``, each fed its last sampled token on the device: one
        CUDA-graph replay per step and no other host work between steps. Returns, in the order of ``slots``,
        device tensors gathered from the sampler's ring buffers after the last step: tokens ``[n, steps]`` and,
        with ``logprobs``, their log-probabilities ``[n, steps]`` and top alternatives (values, ids)
        ``[n, steps, MAX_LOGPROBS]`` (else None). Past a slot's own stop (EOS, stop ids, max tokens) its row
        holds stale values. ``steps`` is at most the ring's ``history``."""
        if not slots or not 1 <= steps <= self.history:
            raise ValueError(f"decode_steps needs slots and 1 <= steps <= {self.history}, got {len(slots)}, {steps}")
        running, ridx = self._select(slots)
        sampler = self.sampler
        start = sampler.pos[ridx]  # each row's first ring position of this window (a copy)
        bsz, mode = self._bucket(running), sampler.mode(running)
        if logprobs and not mode.endswith("+lp"):
            raise ValueError("logprobs asked for, but no slot in the window was configured with logprobs")
        step = self._graph(bsz, mode)[0].replay if self.use_cuda_graph else self._step_fn(bsz, mode)
        for _ in range(steps):
            step()
        rows = ridx[:, None]
        cols = (start[:, None] + torch.arange(steps, device=self.device)) % self.history
        if not logprobs:
            return sampler.hist[rows, cols], None, None, None
        return sampler.hist[rows, cols], sampler.hist_lp[rows, cols], sampler.hist_top_lp[rows, cols], \
            sampler.hist_top_ids[rows, cols]

    # ------------------------------------------------------------------ speculative
    @torch.no_grad()
    def spec_step(self, drafts: dict[int, Sequence[int]] | None = None, slots: Sequence[int] | None = None) -> None:
        """One speculative step of every running slot (each emits 1 to k+1 tokens: read them with
        :meth:`read_tokens`; see :class:`~fastxlstm.engine.speculative.Speculation`). ``drafts``: slot -> up
        to k proposed tokens (the n-gram drafter; missing or short entries verify fewer); with a draft
        model None (it drafts on the device). ``slots``: exactly these slots run (as :meth:`decode_step`'s).
        One CUDA-graph replay per batch bucket; no host sync."""
        if self.spec is None:
            raise RuntimeError("speculative decoding is not configured (Engine(speculative=...))")
        running, _ = self._select(slots)
        if not running:
            return
        bsz = self._bucket(running)
        self.spec.load_drafts(bsz, drafts)
        mode = self.sampler.mode(running)
        if self.use_cuda_graph:
            self._graph(bsz, mode, spec=True)[0].replay()
        else:
            self.spec.step_fn(bsz, mode)()

    def prefill_draft(self, slot: int, prefix: Sequence[int]) -> None:
        """With a draft model: its state of ``slot`` after ``prefix`` (the sequence's tokens before the pending
        one, what the target's slot state holds). A no-op without one."""
        self._check_allocated(slot)
        if self.spec is not None and self.spec.draft is not None:
            self.spec.draft.prefill(slot, prefix)

    def spec_counts(self, slot: int) -> tuple[int, int, int]:
        """``(steps, drafted, accepted)`` of the slot's speculative steps since it was configured (host read)."""
        return (0, 0, 0) if self.spec is None else self.spec.counts(slot)

    # ------------------------------------------------------------------------ reads
    def read_tokens(self, slots: Sequence[int], start: Sequence[int] | None = None) -> list[SlotRead]:
        """Tokens (and logprobs, where asked for) each slot sampled since the last read (one host sync);
        ``start``: per slot, the tokens it sampled that the caller already has (read from position ``start``)."""
        reads = self.sampler.read([int(s) for s in slots], start)
        for rd in reads:
            if rd.finished:
                self._running.discard(rd.slot)
        return reads

    # ------------------------------------------------------------------------ state
    def get_slot_state(self, slot: int) -> list[State]:
        """A copy of the slot's recurrent state: per block ``(C [1,NH,DQK,DV], n [1,NH,DQK], m [1,NH])``,
        float32 whatever the storage dtype."""
        self._check_slot(slot)
        return [tuple(t[slot:slot + 1].to(torch.float32, copy=True) for t in layer) for layer in self.states]

    def set_slot_state(self, slot: int, state: list[State]) -> None:
        """Overwrite the slot's recurrent state (shapes as :meth:`get_slot_state` returns)."""
        self._check_allocated(slot)
        state = self._as_state(state)
        if isinstance(state, PackedState):  # one copy of the row's tensors (split with one op) into the slot's
            torch._foreach_copy_(self._rows[slot], state.flat.split(state.layout.tensor_sizes, dim=1))
        else:
            self._store_states([slot], state)
