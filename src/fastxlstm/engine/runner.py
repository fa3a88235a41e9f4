"""The engine's forward pass: the model's math on fused weights with fused kernels.

``Runner.forward_tokens`` is the prefill (any number of tokens, state carried in and out,
chunked over the sequence so peak memory does not grow with the prompt); ``Runner.decode``
is one token for a batch of state rows updated in place (what the CUDA graphs capture).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model import XLSTMForCausalLM
from ..ops import mlstm_chunkwise, mlstm_commit_, resolve_backend
from ..ops.quant import linear
from ..ops.reference import mlstm_step_reference
from ..state import State, zero_state
from . import kernels as K
from .prefill_graph import PrefillGraphs, padding_mask
from .transfer import to_device
from .weights import LayerWeights, fuse_weights, weight_of

StepFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, float], Tensor]


# ------------------------------------------------------------------------- step kernels
def step_inplace_reference(q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor, c: Tensor, n: Tensor,
                           m: Tensor, eps: float) -> Tensor:
    """:func:`fastxlstm.ops.reference.mlstm_step_reference` with ``(c, n, m)`` updated in place.
    q,k ``[B,NH,DQK]``, v ``[B,NH,DV]``, i,f ``[B,NH]`` float32; returns h ``[B,NH,DV]`` in q's
    dtype. Rows with ``i=-inf, f=+inf`` keep their state unchanged."""
    h, new = mlstm_step_reference(q, k, v, i, f, (c.float(), n, m), eps)
    for buf, t in zip((c, n, m), new):
        buf.copy_(t)
    return h


def step_inplace_bmm(q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor, c: Tensor, n: Tensor,
                     m: Tensor, eps: float) -> Tensor:
    """Same function as :func:`step_inplace_reference` with batched matmuls and no [B,NH,DQK,DV]
    temporaries (the GPU fallback when no fused step kernel is available)."""
    b, nh, dqk = q.shape
    dv = v.shape[-1]
    dt = torch.float32
    c_store, c = c, c.float()
    log_f = F.logsigmoid(f)
    m_new = torch.maximum(log_f + m, i)
    f_act = torch.exp(log_f + m - m_new)
    i_act = torch.exp(i - m_new)
    kf = k.to(dt) * i_act[..., None]
    cv = c.view(b * nh, dqk, dv)
    cv.mul_(f_act.view(-1, 1, 1)).baddbmm_(kf.view(-1, dqk, 1), v.to(dt).reshape(-1, 1, dv))
    n.mul_(f_act[..., None]).add_(kf)
    m.copy_(m_new)
    q_scaled = q.to(dt) * (dqk ** -0.5)
    num = torch.bmm(q_scaled.reshape(-1, 1, dqk), cv).view(b, nh, dv)
    den = torch.maximum((q_scaled * n).sum(-1).abs(), torch.exp(-m)) + eps
    if c_store is not c:
        c_store.copy_(c)
    return (num / den[..., None]).to(q.dtype)


def _triton_module():
    try:
        return importlib.import_module("fastxlstm.ops.triton")
    except ImportError:
        return None


def _triton_step() -> StepFn | None:
    """The in-place Triton step kernel of :mod:`fastxlstm.ops.triton`, when it exists."""
    mod = _triton_module()
    fn = getattr(mod, "mlstm_step_", None) if mod is not None else None
    if fn is None:
        return None

    def step(q, k, v, i, f, c, n, m, eps):
        h = torch.empty(v.shape, device=v.device, dtype=q.dtype)
        if c.dtype != torch.float32:  # a low-precision state store: update a float32 copy
            c32 = c.float()
            fn(q, k, v, i, f, c32, n, m, h, eps=eps)
            c.copy_(c32)
            return h
        fn(q, k, v, i, f, c, n, m, h, eps=eps)  # strided q/k/v views are fine (last dim contiguous)
        return h

    return step


def select_step(backend: str, device: torch.device) -> tuple[str, StepFn]:
    """``(name, fn)`` of the in-place step used for decoding on ``device``."""
    on_gpu = device.type == "cuda" and resolve_backend(backend, device) == "triton"
    if on_gpu or (K.INTERPRET and backend == "triton"):
        fn = _triton_step()
        if fn is not None:
            return "triton", fn
        if backend == "triton" and device.type == "cuda":
            raise RuntimeError("backend='triton' but fastxlstm.ops.triton has no in-place mlstm_step_")
    if device.type == "cuda":
        return "torch-bmm", step_inplace_bmm
    return "reference", step_inplace_reference


def pow2_ok(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def row_lengths(lengths: Sequence[int] | None, b: int, total: int) -> list[int] | None:
    """``lengths`` (each row's real tokens of a right-padded ``[b, total]`` batch) as ints, checked: ``b`` of
    them, each in ``[1, total]``; None stays None."""
    if lengths is None:
        return None
    lengths = [int(n) for n in lengths]
    if len(lengths) != b or min(lengths) < 1 or max(lengths) > total:
        raise ValueError(f"lengths must be {b} values in [1, {total}], got {lengths}")
    return lengths


# ------------------------------------------------------------------------------ runner
class Runner:
    """Fused forward of an :class:`XLSTMForCausalLM` (weights shared with the model)."""

    def __init__(self, model: XLSTMForCausalLM, backend: str = "auto", chunk_size: int = 4096):
        if chunk_size <= 0:
            raise ValueError(f"prefill chunk size must be positive, got {chunk_size}")
        self.model = model
        self.config = cfg = model.config
        self.backend = backend
        self.chunk_size = chunk_size
        self.layers = fuse_weights(model)
        self.embedding = model.backbone.embeddings.weight.detach()
        out_norm = model.backbone.out_norm
        self.out_norm = out_norm.weight.detach() if isinstance(out_norm, nn.Module) and hasattr(
            out_norm, "weight") else None
        self.lm_head = weight_of(model.lm_head)
        self.nh, self.dqk, self.dv = cfg.num_heads, cfg.qk_head_dim, cfg.v_head_dim
        self.splits = [cfg.qk_dim, cfg.qk_dim, cfg.v_dim, cfg.v_dim, 2 * cfg.num_heads]
        self.step_name, self.step_fn = select_step(backend, model.device)
        # decode: the fused Triton cell (gates + step + head norm + output gate in one launch) where
        # the Triton step runs, and at batch 1 the GEMV path (norms, SwiGLU, residual adds and the
        # logit soft-cap fused into the projections); both are attributes so benchmarks can compare.
        mod = _triton_module() if self.step_name == "triton" else None
        self._cell_fn = getattr(mod, "mlstm_decode_cell_", None)
        self.fused_cell = self._cell_fn is not None and pow2_ok(self.dv)
        self.gemv_decode = self.fused_cell and K.HAS_TRITON
        # prefill: bucketed CUDA graphs for prompts of at most one chunk (set by the Engine)
        self.prefill_graphs: PrefillGraphs | None = None

    @property
    def device(self) -> torch.device:
        return self.lm_head.device

    # ---------------------------------------------------------------------- pieces
    def logits(self, hidden: Tensor) -> Tensor:
        """float32 soft-capped logits of normed hidden states ``[N, D]``."""
        return K.softcap_logits(linear(hidden, self.lm_head), self.config.output_logit_soft_cap)

    def _mlstm_seq(self, lw: LayerWeights, y: Tensor, b: int, s: int, state: State | None,
                   real: Tensor | None = None, terms: list | None = None) -> tuple[Tensor, State]:
        """The mLSTM layer over ``s`` tokens of ``b`` rows; ``real [b*s]`` (bool) marks the real tokens:
        the others (right padding) get neutral gates ``i = -inf, f = +inf`` and leave the state as it is.
        ``terms``: a list to append this layer's per-token state terms ``(k, v, i, f)`` to (``[b, NH, s, *]``,
        k and v views into the projection) for :meth:`commit`."""
        cfg = self.config
        proj = linear(y, lw.w_in)  # [b*s, P]
        q, k, v, o, g = proj.split(self.splits, dim=-1)
        i, f = K.gates(g, self.nh, cfg.gate_soft_cap, real, bias=lw.gate_bias, seq=s)  # [b, NH, s]
        # [b, NH, s, D] views into proj, no copies (the Triton forward reads any batch/head/token strides)
        q, k, v = (t.view(b, s, self.nh, -1).transpose(1, 2) for t in (q, k, v))
        if terms is not None:
            terms.append((k, v, i, f))
        h, state = mlstm_chunkwise(q, k, v, i, f, state, chunk_size=cfg.chunk_size, backend=self.backend,
                                   eps=cfg.eps, final_state=terms is None)
        h = h.transpose(1, 2).reshape(b * s, self.nh, self.dv)
        return K.mhnorm_ogate(h, o, lw.mh_norm, cfg.norm_eps), state

    def _mlstm_step(self, lw: LayerWeights, y: Tensor, c: Tensor, n: Tensor, m: Tensor,
                    active: Tensor | None, proj: Tensor | None = None) -> Tensor:
        """The mLSTM layer of one decode step (``proj``: the input projection, if already done)."""
        cfg = self.config
        bsz = y.shape[0]
        if proj is None:
            proj = linear(y, lw.w_in)
        if self.fused_cell:
            out = torch.empty(bsz, cfg.v_dim, device=y.device, dtype=proj.dtype)
            self._cell_fn(proj, lw.gate_bias, active, c, n, m, lw.mh_norm, out, num_heads=self.nh,
                          cap=cfg.gate_soft_cap, eps=cfg.eps, norm_eps=cfg.norm_eps)
            return out
        q, k, v, o, g = proj.split(self.splits, dim=-1)
        i, f = K.gates(g, self.nh, cfg.gate_soft_cap, active, bias=lw.gate_bias)
        h = self.step_fn(q.reshape(bsz, self.nh, self.dqk), k.reshape(bsz, self.nh, self.dqk),
                         v.reshape(bsz, self.nh, self.dv), i, f, c, n, m, cfg.eps)
        return K.mhnorm_ogate(h, o, lw.mh_norm, cfg.norm_eps)

    def _ffn(self, lw: LayerWeights, y: Tensor) -> Tensor:
        return linear(K.silu_mul(linear(y, lw.w_up), self.config.ffn_dim), lw.w_down)

    # --------------------------------------------------------------------- prefill
    @torch.no_grad()
    def forward_tokens(self, ids: Tensor, state: list[State] | None = None,
                       lengths: Sequence[int] | None = None) -> tuple[Tensor, list[State]]:
        """Prefill ``ids [b, S]`` from ``state`` (None: zeros). Returns the final normed hidden state of
        the last position ``[b, D]`` and the new state (fresh tensors, float32; a
        :class:`~fastxlstm.state.PackedState` where a prefill graph ran). The sequence is
        processed in chunks of ``chunk_size`` tokens with the state carried across.

        ``lengths`` (prompts of different lengths in one forward): row ``j``'s tokens are
        ``ids[j, :lengths[j]]`` and the rest is right padding (any valid ids). Padded positions get
        neutral gates (input gate ``-inf``, forget gate ``+inf``: log f = 0), so the state after them is
        the state after the row's last real token; nothing crosses positions but the mLSTM cell, so the
        real positions compute what they would alone, and the hidden state returned is each row's at its
        own last real token."""
        cfg = self.config
        b, total = ids.shape
        lengths = row_lengths(lengths, b, total)
        if lengths is not None and min(lengths) == total:
            lengths = None  # no padding
        graphs = self.prefill_graphs
        if graphs is not None and graphs.bucket(b, total) is not None:
            return graphs.run(ids, state, lengths)
        if lengths is not None:
            lens = to_device(lengths, ids.device)
        if state is None:
            state = [None] * cfg.num_blocks  # type: ignore[list-item]
        state = list(state)
        last = None
        for start in range(0, total, self.chunk_size):
            chunk = ids[:, start:start + self.chunk_size]
            s = chunk.shape[1]
            real = None
            if lengths is not None and min(lengths) < start + s:
                real = padding_mask(lens - start, s)
            x, delta = self.blocks(chunk, state, real)
            if lengths is None:
                last = x.view(b, s, -1)[:, -1].clone()
                last += delta.view(b, s, -1)[:, -1]
            else:  # rows whose last real token lies in this chunk
                rows = [j for j, n in enumerate(lengths) if start < n <= start + s]
                if rows:
                    if last is None:
                        last = torch.empty(b, x.shape[-1], device=x.device, dtype=x.dtype)
                    flat = to_device([j * s + lengths[j] - 1 - start for j in rows], x.device)
                    sel = to_device(rows, x.device)
                    last.index_copy_(0, sel, x.index_select(0, flat) + delta.index_select(0, flat))
            del x, delta
        hidden = K.add_rmsnorm(last, None, self.out_norm, cfg.norm_eps)
        return hidden, state

    def blocks(self, chunk: Tensor, state: list[State | None], real: Tensor | None,
               terms: list | None = None) -> tuple[Tensor, Tensor]:
        """Every block over ``chunk [b, s]``; ``state`` (per block, None: zeros) is replaced in place by
        the new states. Returns the residual stream ``x`` and the last FFN output ``delta`` ``[b*s, D]``
        (the output is ``x + delta``); ``real [b*s]`` marks real tokens (None: all). With ``terms`` (``s > 1``)
        each block's per-token state terms are collected instead (:meth:`_mlstm_seq`) and ``state`` is kept."""
        cfg = self.config
        b, s = chunk.shape
        x = F.embedding(chunk, self.embedding).reshape(b * s, -1)
        delta = None
        for idx, lw in enumerate(self.layers):
            y = K.add_rmsnorm(x, delta, lw.norm_mlstm, cfg.norm_eps)
            if s == 1 and terms is None:
                if state[idx] is None:
                    state[idx] = zero_state(b, self.nh, self.dqk, self.dv, self.device)
                c, n, m = (t.clone() for t in state[idx])
                h = self._mlstm_step(lw, y, c, n, m, real)
                state[idx] = (c, n, m)
            else:
                h, new = self._mlstm_seq(lw, y, b, s, state[idx], real, terms)
                if terms is None:  # (verification keeps the terms, not the states)
                    state[idx] = new
                del new
            y = K.add_rmsnorm(x, linear(h, lw.w_out), lw.norm_ffn, cfg.norm_eps)
            del h
            delta = self._ffn(lw, y)
        return x, delta

    # ---------------------------------------------------------------------- decode
    @torch.no_grad()
    def decode(self, tokens: Tensor, states: list[State], active: Tensor | None = None) -> Tensor:
        """One token per row: ``tokens [B]``, ``states`` per block ``(C,n,m)`` with leading dim B,
        updated in place (rows with ``active == False`` unchanged). Returns float32 logits ``[B, V]``."""
        cfg = self.config
        x = F.embedding(tokens, self.embedding)
        if self.gemv_decode and x.shape[0] == 1:
            return self._decode_gemv(x, states, active)
        delta = None
        for lw, (c, n, m) in zip(self.layers, states):
            y = K.add_rmsnorm(x, delta, lw.norm_mlstm, cfg.norm_eps)
            h = self._mlstm_step(lw, y, c, n, m, active)
            y = K.add_rmsnorm(x, linear(h, lw.w_out), lw.norm_ffn, cfg.norm_eps)
            delta = self._ffn(lw, y)
        y = K.add_rmsnorm(x, delta, self.out_norm, cfg.norm_eps)
        return self.logits(y)

    def _decode_gemv(self, x: Tensor, states: list[State], active: Tensor | None) -> Tensor:
        """Batch-1 decode: per block four fused GEMVs and the fused cell (five launches)."""
        from .gemv import gemv

        cfg = self.config
        eps = cfg.norm_eps
        for lw, (c, n, m) in zip(self.layers, states):
            proj = gemv(x, lw.w_in, prologue="rmsnorm", norm_weight=lw.norm_mlstm, eps=eps)
            h = self._mlstm_step(lw, x, c, n, m, active, proj=proj)
            gemv(h, lw.w_out, epilogue="residual", residual=x)
            gu = gemv(x, lw.w_up, prologue="rmsnorm", norm_weight=lw.norm_ffn, eps=eps)
            gemv(gu, lw.w_down, prologue="silu_mul", epilogue="residual", residual=x)
        return gemv(x, self.lm_head, prologue="none" if self.out_norm is None else "rmsnorm",
                    norm_weight=self.out_norm, eps=eps, epilogue="softcap", cap=cfg.output_logit_soft_cap)


    # ------------------------------------------------------------------ speculative
    @torch.no_grad()
    def verify(self, ids: Tensor, states: list[State]) -> tuple[Tensor, list[tuple[Tensor, Tensor, Tensor, Tensor]]]:
        """Score ``ids [b, s]`` from ``states`` (per block ``(C, n, m)``, leading dim b; not modified) in one
        chunkwise forward: float32 soft-capped logits at every position ``[b, s, V]`` and every block's
        per-token state terms ``(k, v, i, f)`` (what :meth:`commit` applies). Capturable."""
        cfg = self.config
        b, s = ids.shape
        terms: list = []
        x, delta = self.blocks(ids, [tuple(t.float() for t in st) for st in states], None, terms)  # C as float32
        hidden = K.add_rmsnorm(x, delta, self.out_norm, cfg.norm_eps)
        return self.logits(hidden).view(b, s, -1), terms

    @torch.no_grad()
    def commit(self, states: list[State], terms: list[tuple[Tensor, Tensor, Tensor, Tensor]], lengths: Tensor) -> None:
        """Advance ``states`` in place over the first ``lengths[b]`` tokens whose ``terms`` :meth:`verify`
        returned (``lengths [b]`` on the device, 0 leaves a row as it is); no weight is read. Capturable."""
        for st, (k, v, i, f) in zip(states, terms):
            mlstm_commit_(st, k, v, i, f, lengths, backend=self.backend)

    # --------------------------------------------------------------------- scoring
    @torch.no_grad()
    def token_logprobs(self, ids: Tensor, targets: Tensor, state: list[State] | None = None,
                       lengths: Sequence[int] | None = None, top_k: int = 0, head_rows: int = 1024,
                       last_logits: bool = False) -> TokenScores:
        """Score ``targets [b, S]`` (usually ``ids`` shifted left by one) after ``ids [b, S]`` from ``state``
        (None: zeros), with the chunked, state-carrying forward of :meth:`forward_tokens` (``lengths``:
        right padding, as there). Per sequence chunk the normed hidden states go through the LM head, the
        logit soft-cap and a float32 log-softmax ``head_rows`` positions at a time (padding skipped), so
        neither ``[S, V]`` nor ``[chunk, V]`` logits are ever held: memory is constant in ``S``. Positions
        depend on the past only through the state, so a long sequence may be scored in pieces, each
        continuing the state the previous one returned. ``last_logits``: also the logits after each row's last
        real token (what sampling a continuation needs). Returns a :class:`TokenScores`."""
        cfg = self.config
        b, total = ids.shape
        if total < 1:
            raise ValueError("ids must hold at least one position")
        if targets.shape != ids.shape:
            raise ValueError(f"targets must have the shape of ids {tuple(ids.shape)}, got {tuple(targets.shape)}")
        if not 0 <= top_k <= cfg.vocab_size or head_rows <= 0:
            raise ValueError(f"need 0 <= top_k <= vocab_size and head_rows > 0, got {top_k}, {head_rows}")
        lengths = row_lengths(lengths, b, total)
        dev = ids.device
        lens = to_device(lengths if lengths is not None else [total] * b, dev)
        flat_targets = targets.reshape(-1).to(dev)
        real_all = padding_mask(lens, total)
        lo, hi = torch.where(real_all, flat_targets, 0).aminmax()
        if int(lo) < 0 or int(hi) >= cfg.vocab_size:
            raise ValueError(f"targets must lie in [0, {cfg.vocab_size}), got [{int(lo)}, {int(hi)}]")
        logprobs = torch.zeros(b * total, device=dev)
        greedy = torch.zeros(b * total, device=dev, dtype=torch.bool)
        top_ids = torch.zeros(b * total, top_k, device=dev, dtype=torch.long)
        top_lp = torch.zeros(b * total, top_k, device=dev)
        ranks = torch.zeros(b * total, device=dev, dtype=torch.long)
        last_pos = torch.arange(b, device=dev) * total + lens - 1  # flat position of each row's last token
        last = torch.zeros(b, cfg.vocab_size, device=dev) if last_logits else None
        state = list(state) if state is not None else [None] * cfg.num_blocks
        for start in range(0, total, self.chunk_size):
            chunk = ids[:, start:start + self.chunk_size]
            s = chunk.shape[1]
            real = padding_mask(lens - start, s) if lengths is not None and min(lengths) < start + s else None
            x, delta = self.blocks(chunk, state, real)
            hidden = K.add_rmsnorm(x, delta, self.out_norm, cfg.norm_eps)  # [b*s, D]
            del x, delta
            rows = torch.arange(b * s, device=dev) if real is None else real.nonzero().view(-1)
            out_pos = (rows // s) * total + start + rows % s  # chunk row -> flat output position
            for r0 in range(0, rows.numel(), head_rows):
                sel, pos = rows[r0:r0 + head_rows], out_pos[r0:r0 + head_rows]
                logits = self.logits(hidden.index_select(0, sel))  # float32 [n, V]
                lp = torch.log_softmax(logits, dim=-1)
                tgt = flat_targets.index_select(0, pos)
                chosen = lp.gather(1, tgt[:, None])
                logprobs.index_copy_(0, pos, chosen.view(-1))
                greedy.index_copy_(0, pos, logits.argmax(dim=-1) == tgt)
                ranks.index_copy_(0, pos, 1 + (lp > chosen).sum(dim=-1))
                if last is not None:
                    hit = (pos[:, None] == last_pos[None, :]).nonzero()  # (block row, sequence) pairs
                    if hit.numel():
                        last.index_copy_(0, hit[:, 1], logits.index_select(0, hit[:, 0]))
                if top_k:
                    vals, idx = lp.topk(top_k, dim=-1)
                    top_lp.index_copy_(0, pos, vals)
                    top_ids.index_copy_(0, pos, idx)
                del logits, lp
            del hidden
        return TokenScores(logprobs.view(b, total), greedy.view(b, total), state,
                           top_ids.view(b, total, top_k) if top_k else None,
                           top_lp.view(b, total, top_k) if top_k else None, ranks.view(b, total), last)


@dataclass
class TokenScores:
    """What :meth:`Runner.token_logprobs` returns. ``logprobs [b, S]`` float32: ``log p(targets[j, t] |
    ids[j, :t+1], state)`` (0 at padding); ``greedy [b, S]`` bool: the target is the argmax (False at
    padding); ``top_ids`` / ``top_logprobs [b, S, k]`` (``top_k > 0`` only): the k most likely tokens per
    position (0 at padding); ``state``: per block ``(C, n, m)`` after each row's last real token; ``ranks
    [b, S]``: 1 + the number of tokens more likely than the target (0 at padding); ``last_logits [b, V]``
    (``last_logits=True`` only): float32 logits after each row's last real token."""

    logprobs: Tensor
    greedy: Tensor
    state: list[State]
    top_ids: Tensor | None = None
    top_logprobs: Tensor | None = None
    ranks: Tensor | None = None
    last_logits: Tensor | None = None
