"""The Mamba2 peer: transformers' ``Mamba2ForCausalLM`` at Codestral-Mamba-7B shapes, random weights.

Kernels: ``mamba_ssm``'s Triton kernels (the SSD chunk scan for the prefill, ``selective_state_update``
for decode), which transformers picks up when ``mamba_ssm`` imports. ``mamba_ssm``'s package
``__init__`` imports its compiled CUDA extension, which a build without CUDA (``MAMBA_SKIP_CUDA_BUILD``)
lacks; :func:`load_mamba_ssm_triton` registers the package without running that ``__init__`` so its
pure-Triton modules import on their own. The causal conv1d runs on transformers' PyTorch path
(``causal_conv1d`` is a CUDA extension). Decode: one CUDA graph of the model's step on its own cache
(transformers keeps the conv and SSM states at static addresses), greedy on the GPU, as the paper did.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import sys
import types

import torch

from .common import Plan, Recorder, device, free_memory, seeded_tokens
from .loops import StaticDecoder, prefill_loop, static_decode, ttft_loop, weights_gb

# mistralai/Mamba-Codestral-7B-v0.1's config.json shapes (= transformers' Mamba2Config defaults).
CODESTRAL_MAMBA_7B = dict(vocab_size=32768, hidden_size=4096, num_hidden_layers=64, num_heads=128, head_dim=64,
                          state_size=128, n_groups=8, expand=2, conv_kernel=4, chunk_size=256, use_conv_bias=True,
                          use_bias=False, residual_in_fp32=True, tie_word_embeddings=False)
MAMBA2_SMALL = dict(vocab_size=1024, hidden_size=256, num_hidden_layers=2, num_heads=8, head_dim=64, state_size=32,
                    n_groups=2, expand=2, conv_kernel=4, chunk_size=64, use_conv_bias=True, use_bias=False,
                    residual_in_fp32=True, tie_word_embeddings=False)
TRITON_MODULES = ("mamba_ssm.ops.triton.ssd_combined", "mamba_ssm.ops.triton.selective_state_update")


def load_mamba_ssm_triton() -> str | None:
    """Import ``mamba_ssm``'s Triton kernel modules without its package ``__init__`` (which needs the
    compiled ``selective_scan_cuda``). Returns its version, or None when ``mamba_ssm`` is not installed.
    Call before transformers' Mamba2 module is imported (it looks for the kernels at import time)."""
    if "mamba_ssm" not in sys.modules:
        spec = importlib.util.find_spec("mamba_ssm")  # finds the package without executing it
        if spec is None or not spec.submodule_search_locations:
            return None
        pkg = types.ModuleType("mamba_ssm")
        pkg.__path__ = list(spec.submodule_search_locations)
        pkg.__spec__ = spec
        pkg.__version__ = importlib.metadata.version("mamba_ssm")
        sys.modules["mamba_ssm"] = pkg
        try:
            for name in TRITON_MODULES:
                importlib.import_module(name)
        except Exception:
            for name in [m for m in sys.modules if m == "mamba_ssm" or m.startswith("mamba_ssm.")]:
                del sys.modules[name]
            raise
    return getattr(sys.modules["mamba_ssm"], "__version__", "?")


def kernel_paths() -> dict[str, str]:
    """Which implementation each of transformers' Mamba2 kernel hooks resolved to (module names)."""
    from transformers.models.mamba2 import modeling_mamba2 as mm

    out = {}
    for name in ("mamba2_chunk_scan", "mamba2_selective_state_update", "causal_conv1d_fn", "causal_conv1d_update"):
        fn = getattr(mm, name, None)
        impl = None
        while fn is not None and impl is None:
            try:
                impl = inspect.getclosurevars(fn).nonlocals.get("implementation")
            except TypeError:
                break
            fn = getattr(fn, "__wrapped__", None)
        out[name] = getattr(impl, "__module__", "?") if impl is not None else "?"
    return out


def build(small: bool):
    """A random-weight ``Mamba2ForCausalLM`` in bf16 on the bench device."""
    from transformers import Mamba2Config, Mamba2ForCausalLM

    from .systems import _from_config

    cfg = Mamba2Config(**(MAMBA2_SMALL if small else CODESTRAL_MAMBA_7B))
    with torch.device(device()):
        model = _from_config(Mamba2ForCausalLM, cfg).eval()
    return model, cfg


def _cache_kw(model) -> str:
    """transformers renamed the cache argument (``cache_params`` -> ``cache``, the old name kept for a while)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "cache_params"


def _out_cache(out):
    return getattr(out, "cache", None) if getattr(out, "cache", None) is not None else out.cache_params


def _states(cache) -> list[torch.Tensor]:
    """Every state tensor of a Mamba2 cache (conv and SSM states of each layer)."""
    out = []
    for layer in cache.layers:
        for group in (layer.conv_states, layer.recurrent_states):
            out.extend(t for t in group.values() if t is not None)
    return out


def make_decoder(model, plan: Plan, vocab: int, b: int) -> StaticDecoder:
    """A :class:`StaticDecoder` on the model's own cache after a ``plan.decode_prompt``-token prompt."""
    key = _cache_kw(model)
    with torch.no_grad():
        out = model(input_ids=seeded_tokens(plan.decode_prompt, vocab, batch=b), use_cache=True)
    cache = _out_cache(out)
    tok = out.logits[:, -1:].argmax(-1)

    @torch.no_grad()
    def step():
        o = model(input_ids=tok, use_cache=True, **{key: cache})
        tok.copy_(o.logits[:, -1:].argmax(-1))

    @torch.no_grad()
    def reset(ids):
        o = model(input_ids=ids, use_cache=True)
        for buf, x in zip(_states(cache), _states(_out_cache(o)), strict=True):
            buf.copy_(x)
        tok.copy_(o.logits[:, -1:].argmax(-1))

    return StaticDecoder(step, reset, tok)


def run_mamba2(plan: Plan, rec: Recorder) -> None:
    import transformers

    try:
        version = load_mamba_ssm_triton()
    except Exception as e:  # noqa: BLE001  (recorded; the check below then stops the 7B run)
        rec.error("mamba_ssm Triton kernels", e)
        version = None
    rec.set("version", {"transformers": transformers.__version__, "mamba_ssm": version})
    paths = kernel_paths()
    rec.set("kernels", paths)
    if "mamba_ssm" not in paths["mamba2_chunk_scan"] and not plan.small:
        raise RuntimeError("mamba_ssm's Triton kernels are not importable (carry .whl/mamba_ssm-*.whl; see "
                           "benchmarks/README or BENCHMARKS.md): transformers' PyTorch reference scan would "
                           "not be a fair Mamba2 peer")
    model, cfg = build(plan.small)
    wgb = weights_gb(model)
    rec.set("weights_gb", wgb)
    rec.set("config", {k: getattr(cfg, k) for k in ("hidden_size", "num_hidden_layers", "num_heads", "head_dim",
                                                    "state_size", "n_groups", "vocab_size")})
    vocab = cfg.vocab_size

    @torch.no_grad()
    def prefill(ids):
        out = model.backbone(input_ids=ids, use_cache=True)
        return model.lm_head(out.last_hidden_state[:, -1:].to(model.lm_head.weight.dtype)).argmax(-1)

    ttft_loop(plan, rec, prefill, vocab, wgb)
    prefill_loop(plan, rec, prefill, vocab)
    free_memory()
    static_decode(plan, rec, lambda b: make_decoder(model, plan, vocab, b), vocab)
