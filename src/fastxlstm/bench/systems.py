"""One function per benchmarked system; each measures what the plan asks and records it.

Systems: ``fastxlstm`` (this engine), ``official`` (PyPI ``xlstm`` + ``mlstm_kernels``, its Triton
kernels and a CUDA-graph decode step), ``hf-xlstm`` (transformers' ``xLSTMForCausalLM`` as shipped:
native PyTorch kernels, eager steps), ``llama`` (a Llama-3.1-8B-shaped ``LlamaForCausalLM``, SDPA
prefill, static KV cache + ``torch.compile`` decode via ``generate``). All in bf16 with random
weights unless a checkpoint is given (fastxlstm). Greedy decoding everywhere. Peers compute
logits only for the last prompt position, as fastxlstm does.
"""

from __future__ import annotations

import functools

import torch

from ..state import state_nbytes
from .common import (
    GB,
    Plan,
    Recorder,
    device,
    dtype,
    free_memory,
    graph_equals_eager,
    is_oom,
    on_cuda,
    peak_gb,
    random_xlstm,
    reset_peak,
    seeded_tokens,
    sync,
    timed,
)
from .loops import (
    StaticDecoder,
    decode_timing,
    energy,
    failed,
    measured,
    prefill_loop,
    static_decode,
    ttft_loop,
    weights_gb,
)

XLSTM_7B = dict(embedding_dim=4096, num_heads=8, num_blocks=32, vocab_size=50304)
XLSTM_SMALL = dict(embedding_dim=512, num_heads=4, num_blocks=2, vocab_size=1024)
LLAMA_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0,
                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192})
LLAMA_SMALL = dict(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                   num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=131072)


# ------------------------------------------------------------------------------ fastxlstm
class _NotHere(Exception):
    """A GPU-only measurement on the CPU dry run (a note, not an error)."""


def _decode_engine(model, plan: Plan, vocab: int, slots_n: int, state_dtype: str):
    """An engine with ``slots_n`` slots, each continuing the same short prompt (greedy, no stops)."""
    from ..engine import Engine
    from ..sampling import SamplingParams

    eng = Engine(model, max_slots=slots_n, prefill_chunk_size=plan.prefill_chunk, state_dtype=state_dtype)
    slot0 = eng.allocate_slot()
    logits = eng.prefill_into_slot(slot0, seeded_tokens(plan.decode_prompt, vocab)[0])
    for layer in eng.states:
        for buf in layer:
            buf.copy_(buf[0:1].clone().expand_as(buf))
    slots = [slot0] + [eng.allocate_slot() for _ in range(slots_n - 1)]
    params = SamplingParams(max_new_tokens=1 << 30, ignore_eos=True)
    for s in slots:
        eng.configure_slot(s, params)
    eng.sample(slots, logits[None].expand(slots_n, -1).contiguous())
    return eng


def _decode_loop(plan: Plan, rec: Recorder, eng, batches, kind: str) -> None:
    for b in batches:
        if rec.out_of_time(f"{kind} {b}", need_s=10):
            break
        try:
            eng.decode_step(slots=list(range(b)), return_outputs=False)  # sets the active set, captures the graph
            step = lambda eng=eng: eng.decode_step(return_outputs=False)  # noqa: E731
            ms = decode_timing(step, plan.decode_steps)
            rec.add(kind, batch=b, ms_per_step=ms, tok_s=b * 1e3 / ms, **energy(rec, step, ms / 1e3, b, f"{kind} {b}"))
        except Exception as e:  # noqa: BLE001
            rec.error(f"{kind} {b}", e)
            if not is_oom(e):
                break


def run_fastxlstm(plan: Plan, rec: Recorder, quantization: str | None = None) -> None:
    """fastxlstm in bf16, or with ``quantization`` (``fp8`` / ``int8`` weights of the blocks, quantized
    on the GPU from the same bf16 weights; also records the logits' KL divergence from bf16)."""
    from ..config import XLSTMConfig, preset
    from ..engine import LLM, Engine
    from ..engine.engine import capture_graph
    from ..ops.quant import linear

    if plan.model.startswith("random:"):
        cfg = XLSTMConfig(**XLSTM_SMALL, weight_mode="fused") if plan.small else preset(
            plan.model.split(":", 1)[1], weight_mode="fused")
        model = random_xlstm(cfg, device(), dtype())
    else:
        from ..checkpoint import load

        model = load(plan.model, device=device(), dtype=dtype(), weight_mode="fused")
        cfg = model.config
    vocab = cfg.vocab_size
    if quantization:
        from .quant import quantize_against_bf16

        model = quantize_against_bf16(model, quantization, plan, rec)
    wgb = weights_gb(model)
    rec.set("weights_gb", wgb)
    rec.set("config", {"embedding_dim": cfg.embedding_dim, "num_blocks": cfg.num_blocks, "vocab": vocab})

    # TTFT and memory: a one-slot engine (state 1 x ~128 MB for the 7B).
    eng = Engine(model, max_slots=1, prefill_chunk_size=plan.prefill_chunk)
    rec.set("step_kernel", eng.runner.step_name)
    rec.set("prefill_chunk", plan.prefill_chunk)
    slot = eng.allocate_slot()

    def prefill(ids, eng=eng):
        logits = eng.prefill_into_slot(slot, ids[0])
        return eng.sample([slot], logits[None])

    ttft_loop(plan, rec, prefill, vocab, wgb)
    # What the 2k TTFT is made of: the forward alone (CUDA events), as one prefill-graph replay and as
    # the eager chunked forward (kernels launched one by one from Python).
    try:
        if 2048 in plan.prompt_lengths and not plan.small and on_cuda():
            ids = seeded_tokens(2048, vocab, seed=2048)
            graphs = eng.runner.prefill_graphs
            for key, use in (("prefill_forward_gpu_ms_2k", graphs), ("prefill_forward_eager_ms_2k", None)):
                eng.runner.prefill_graphs = use
                eng.runner.forward_tokens(ids)
                sync()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                eng.runner.forward_tokens(ids)
                end.record()
                sync()
                rec.set(key, start.elapsed_time(end))
            eng.runner.prefill_graphs = graphs
    except Exception as e:  # noqa: BLE001
        rec.error("prefill breakdown", e)
    eng = prefill = None
    free_memory()

    # Prefill throughput: an engine with one slot per row; equal-length prompts share one forward.
    if plan.prefill_shapes:
        try:
            eng = Engine(model, max_slots=max(b for b, _ in plan.prefill_shapes), prefill_chunk_size=plan.prefill_chunk)
            slots = [eng.allocate_slot() for _ in range(eng.max_slots)]
            prefill_loop(plan, rec, lambda ids, eng=eng: eng.prefill_into_slots(slots[:len(ids)], list(ids)), vocab)
        except Exception as e:  # noqa: BLE001
            rec.error("prefill setup", e)
        eng = None
        free_memory()

    # Decode throughput: one engine with max(batch) slots; every slot continues a short prompt.
    max_b = max(plan.batch_sizes)
    try:
        eng = _decode_engine(model, plan, vocab, max_b, plan.state_dtype)
        rec.set("state_dtype", plan.state_dtype)
        rec.set("decode_paths", {"fused_cell": eng.runner.fused_cell, "gemv_batch1": eng.runner.gemv_decode})
        rec.set("state_buffer_gb", state_nbytes(eng.states) / GB)
    except Exception as e:  # noqa: BLE001
        rec.error("decode setup", e)
        return
    _decode_loop(plan, rec, eng, plan.batch_sizes, "decode")
    # CUDA graph vs eager: same greedy tokens (batch 4, 16 steps, same start state).
    try:
        if on_cuda():
            rec.set("graph_equals_eager", graph_equals_eager(eng, min(4, max_b), 16))
    except Exception as e:  # noqa: BLE001
        rec.error("graph vs eager", e)
    # What bounds decode: the same step with only its GEMMs (weights streaming) and the state
    # traffic (one read + one write of every slot's float32 state), and the copy bandwidth.
    try:
        if not on_cuda():
            raise _NotHere
        floor = {}
        runner = eng.runner
        for b in [x for x in plan.batch_sizes if x in (1, 32, 128, 256)]:
            x = torch.randn(b, cfg.embedding_dim, device="cuda", dtype=torch.bfloat16)
            hmid = torch.randn(b, cfg.ffn_dim, device="cuda", dtype=torch.bfloat16)
            hv = torch.randn(b, cfg.v_dim, device="cuda", dtype=torch.bfloat16)

            def gemms(x=x, hmid=hmid, hv=hv):
                for lw in runner.layers:
                    linear(x, lw.w_in)
                    linear(hv, lw.w_out)
                    linear(x, lw.w_up)
                    linear(hmid, lw.w_down)
                linear(x, runner.lm_head)

            g, _ = capture_graph(gemms, warmup=1)
            floor[b] = decode_timing(g.replay, 20)
        rec.set("gemm_only_ms_per_step", floor)
        src = torch.empty(int(2e9) // 2, device="cuda", dtype=torch.bfloat16)
        dst = torch.empty_like(src)
        ms = decode_timing(lambda src=src, dst=dst: dst.copy_(src), 10)
        rec.set("copy_tb_s", 2 * 2e9 / (ms * 1e-3) / 1e12)
        src = dst = None
    except _NotHere:
        rec.data["notes"].append("floors: measured on a GPU only")
    except Exception as e:  # noqa: BLE001
        rec.error("floors", e)
    eng = None
    free_memory()

    # The opt-in bf16 state store (C in bf16, float32 math) at the batch sizes it is for.
    if plan.state_dtype == "float32" and not plan.small and not quantization:
        extra = [b for b in plan.batch_sizes if b in (32, 128, 256)]
        if extra and not rec.out_of_time("decode_bf16_state", need_s=25):
            try:
                rec.data.setdefault("decode_bf16_state", [])
                eng = _decode_engine(model, plan, vocab, max(extra), "bfloat16")
                _decode_loop(plan, rec, eng, extra, "decode_bf16_state")
            except Exception as e:  # noqa: BLE001
                rec.error("decode_bf16_state", e)
            eng = None
            free_memory()

    # End-to-end generate() through the Python API (batch 1, greedy, no EOS stop).
    try:
        llm = LLM(model, max_slots=1, prefill_chunk_size=plan.prefill_chunk)
        prompt = seeded_tokens(16, vocab)[0].tolist()
        llm.generate(prompt, max_new_tokens=32, ignore_eos=True)
        for n in plan.generate_lengths:
            if rec.out_of_time(f"generate {n}", need_s=n / 100):
                break
            out: list = []
            reset_peak()
            t, row = measured(rec, lambda n=n, out=out: out.append(llm.generate(prompt, max_new_tokens=n,
                                                                                 ignore_eos=True)), n, f"generate {n}")
            assert len(out[0][0].token_ids) == n
            rec.add("generate", prompt_len=16, new_tokens=n, s=t, tok_s=n / t, peak_gb=peak_gb(), **row)
    except Exception as e:  # noqa: BLE001
        rec.error("generate", e)


# ------------------------------------------------------------------------------- official
def run_official(plan: Plan, rec: Recorder) -> None:
    import xlstm
    from xlstm.xlstm_large.model import xLSTMLarge, xLSTMLargeConfig

    rec.set("version", getattr(xlstm, "__version__", "?"))
    dims = XLSTM_SMALL if plan.small else XLSTM_7B
    kernel = "chunkwise--triton_limit_chunk"
    cfg = xLSTMLargeConfig(**dims, return_last_states=True, mode="inference", chunkwise_kernel=kernel,
                           sequence_kernel="native_sequence__triton", step_kernel="triton", weight_mode="fused")
    rec.set("kernels", {"chunkwise": kernel, "sequence": "native_sequence__triton", "step": "triton"})
    torch.set_default_dtype(dtype())
    try:
        with torch.device(device()):
            model = xLSTMLarge(cfg).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    from xlstm.xlstm_large.components import soft_cap

    wgb = weights_gb(model)
    rec.set("weights_gb", wgb)
    vocab = dims["vocab_size"]

    @torch.no_grad()
    def prefill(ids):
        x, _ = model.backbone(model.embedding(ids), None)
        return soft_cap(model.lm_head(x[:, -1:]), cfg.output_logit_soft_cap).argmax(-1)

    ttft_loop(plan, rec, prefill, vocab, wgb)
    free_memory()

    @torch.no_grad()
    def make(b: int) -> StaticDecoder:
        logits, state = model(seeded_tokens(plan.decode_prompt, vocab, batch=b))
        tok = logits[:, -1:].argmax(-1)

        @torch.no_grad()
        def step():
            out, _ = model(tok, state)
            tok.copy_(out[:, -1:].argmax(-1))

        @torch.no_grad()
        def reset(ids):
            out, new = model(ids)
            for layer, fresh in zip(state.values(), new.values()):
                for buf, x in zip(layer, fresh):
                    buf.copy_(x)
            tok.copy_(out[:, -1:].argmax(-1))

        return StaticDecoder(step, reset, tok)

    prefill_loop(plan, rec, prefill, vocab)
    free_memory()
    static_decode(plan, rec, make, vocab)


# ------------------------------------------------------------------------------- hf-xlstm
def _from_config(cls, config):
    try:
        return cls._from_config(config, dtype=dtype())
    except TypeError:
        return cls._from_config(config, torch_dtype=dtype())


def run_hf_xlstm(plan: Plan, rec: Recorder) -> None:
    import transformers
    from transformers import xLSTMConfig, xLSTMForCausalLM
    from transformers.models.xlstm import modeling_xlstm

    rec.set("version", transformers.__version__)
    rec.set("external_xlstm_kernels", bool(getattr(modeling_xlstm, "external_xlstm", False)))
    dims = XLSTM_SMALL if plan.small else XLSTM_7B
    cfg = xLSTMConfig(vocab_size=dims["vocab_size"], hidden_size=dims["embedding_dim"],
                      num_hidden_layers=dims["num_blocks"], num_blocks=dims["num_blocks"], num_heads=dims["num_heads"])
    with torch.device(device()):
        model = _from_config(xLSTMForCausalLM, cfg).eval()
    wgb = weights_gb(model)
    rec.set("weights_gb", wgb)
    vocab = dims["vocab_size"]

    @torch.no_grad()
    def prefill(ids):
        out = model.backbone(input_ids=ids, use_cache=True)
        h = out.last_hidden_state[:, -1:]
        return model.lm_head(h.to(model.lm_head.weight.dtype)).float().argmax(-1)

    limit = None if plan.small else 32768
    ttft_loop(plan, rec, prefill, vocab, wgb, max_len=limit, repeats=1)
    prefill_loop(plan, rec, prefill, vocab, max_tokens=limit)
    free_memory()
    for b in plan.batch_sizes:
        if b > 32 and not plan.small:
            rec.data["notes"].append(f"decode batch {b} not run (eager native kernels; time budget)")
            continue
        if rec.out_of_time(f"decode {b}", need_s=20):
            break
        try:
            with torch.no_grad():
                out = model(input_ids=seeded_tokens(plan.decode_prompt, vocab, batch=b), use_cache=True)
                key = "cache" if getattr(out, "cache", None) is not None else "cache_params"
                cache = getattr(out, key)
                tok = out.logits[:, -1:].argmax(-1)

                def step(cache=cache, key=key):
                    nonlocal tok
                    o = model(input_ids=tok, use_cache=True, **{key: cache})
                    tok = o.logits[:, -1:].argmax(-1)

                ms = decode_timing(step, max(8, plan.decode_steps // 4), warmup=2)
                row = energy(rec, step, ms / 1e3, b, f"decode {b}")
            rec.add("decode", batch=b, ms_per_step=ms, tok_s=b * 1e3 / ms, method="eager steps", **row)
            del cache, out
            free_memory()
        except Exception as e:  # noqa: BLE001
            if failed(rec, f"decode {b}", e):
                break


# ---------------------------------------------------------------------------------- llama
def run_llama(plan: Plan, rec: Recorder) -> None:
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    rec.set("version", transformers.__version__)
    dims = LLAMA_SMALL if plan.small else LLAMA_8B
    cfg = LlamaConfig(**dims, attn_implementation="sdpa")
    with torch.device(device()):
        model = _from_config(LlamaForCausalLM, cfg).eval()
    with torch.no_grad():  # random init (from_config may leave memory uninitialised)
        gen = torch.Generator(device=device()).manual_seed(0)
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.02, generator=gen)
    wgb = weights_gb(model)
    rec.set("weights_gb", wgb)
    vocab = dims["vocab_size"]

    @torch.no_grad()
    def prefill(ids):
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].argmax(-1)

    ttft_loop(plan, rec, prefill, vocab, wgb)
    prefill_loop(plan, rec, prefill, vocab)
    free_memory()

    @torch.no_grad()
    def generate(ids, n):  # no torch.compile on a CPU (the dry run)
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              cache_implementation="static", pad_token_id=0, disable_compile=not on_cuda())

    # batch 1: the longest generate length gives both total time and tok/s (each new length
    # recompiles the static-cache graph, so lengths are kept few).
    for b in plan.batch_sizes:
        if b not in (1, 32, 128) and not plan.small:
            continue
        if rec.out_of_time(f"decode {b}", need_s=45):
            break
        n = max(plan.generate_lengths, default=plan.decode_steps) if b == 1 else plan.decode_steps
        try:
            ids = seeded_tokens(plan.decode_prompt, vocab, batch=b)
            t_compile, _ = timed(lambda ids=ids, n=n: generate(ids, n))
            reset_peak()
            t, row = measured(rec, lambda ids=ids, n=n: generate(ids, n), b * n, f"decode {b}")
            peak = peak_gb()
            t_pre, _ = timed(lambda ids=ids: prefill(ids))
            ms = (t - t_pre) * 1e3 / n
            rec.add("decode", batch=b, ms_per_step=ms, tok_s=b * 1e3 / ms, new_tokens=n, first_call_s=t_compile,
                    method="generate(static cache, auto torch.compile); prefill time subtracted; energy: the "
                    "whole generate call", **row)
            if b == 1:
                rec.add("generate", prompt_len=plan.decode_prompt, new_tokens=n, s=t, tok_s=n / t, peak_gb=peak, **row)
            free_memory()
        except Exception as e:  # noqa: BLE001
            if failed(rec, f"decode {b}", e):
                break


SYSTEMS = {"fastxlstm": run_fastxlstm, "official": run_official, "hf-xlstm": run_hf_xlstm, "llama": run_llama,
           "fastxlstm-fp8": functools.partial(run_fastxlstm, quantization="fp8"),
           "fastxlstm-int8": functools.partial(run_fastxlstm, quantization="int8")}
