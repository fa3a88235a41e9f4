"""Weight quantization on the CPU: per-channel int8 / FP8 weights against float64 references, the
embedded model's logits and held-out perplexity against the unquantized model, save -> load round
trips (bitwise), load-time quantization, the engine on a quantized model, and the errors.

Bounds (documented in BENCHMARKS.md, Quantization): on the embedded model, relative L2 logits error
int8 <= 0.02, fp8 <= 0.06 (measured 0.006 / 0.024); held-out perplexity (first 2,048 tokens) int8 within
2 %, fp8 within 5 %.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import fastxlstm
from fastxlstm.config import XLSTMConfig
from fastxlstm.model.quant import QuantLinear, quantize_model
from fastxlstm.ops.quant import QuantWeight, dequantize, fp8_linear_w8a8, linear, quantize_rows_fp8, quantize_weight

from .helpers import perturbed_model
from .test_training_embedded import HELDOUT, MODEL

CFG = XLSTMConfig(vocab_size=320, embedding_dim=128, num_blocks=2, num_heads=2)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids)[0]


@pytest.fixture(scope="module")
def embedded():
    return fastxlstm.load(MODEL)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 8192, (2, 96), generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------- ops
def test_quantize_weight_per_channel_against_float64():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 72, generator=g) * torch.rand(40, 1, generator=g) * 3
    w[7] = 0.0  # an all-zero row gets scale 1 and zeros
    wd = w.double()
    amax = wd.abs().amax(1, keepdim=True)
    for scheme, qmax in (("int8", 127.0), ("fp8", 448.0)):
        q = quantize_weight(w, scheme)
        want_scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
        assert q.scale.dtype == torch.float32 and q.scale.shape == (40, 1)
        assert torch.allclose(q.scale.double(), want_scale, rtol=1e-7, atol=0)
        err = (dequantize(q, torch.float64) - wd).abs()
        if scheme == "int8":
            assert q.data.dtype == torch.int8 and q.data.abs().max() == 127
            assert torch.equal(q.data.double(), (wd / q.scale.double()).round())
            assert (err <= q.scale.double() / 2 * (1 + 1e-6)).all()
        else:
            assert q.data.dtype == torch.float8_e4m3fn and q.data.float().abs().max() == 448
            # e4m3: 3 mantissa bits (half-ulp 2^-4 relative), subnormal step 2^-9 (in units of the scale)
            assert (err <= wd.abs() * 2**-4 + q.scale.double() * 2**-10).all()
        assert torch.equal(q.data[7].float(), torch.zeros(72)) and q.scale[7].item() == 1.0


@pytest.mark.parametrize("scheme,dtype", [("int8", torch.float32), ("int8", torch.bfloat16),
                                          ("fp8", torch.float32), ("fp8", torch.bfloat16)])
def test_cpu_linear_against_float64(scheme, dtype):
    """Every CPU path (torch's int8 weight-only kernel for float32 activations, the dequantized reference
    otherwise) computes ``x @ (data * scale).T``."""
    g = torch.Generator().manual_seed(1)
    q = quantize_weight(torch.randn(48, 96, generator=g), scheme)
    x = torch.randn(3, 5, 96, generator=g).to(dtype)
    bias = torch.randn(48, generator=g).to(dtype)
    y = linear(x, q, bias)
    assert y.shape == (3, 5, 48) and y.dtype == dtype
    want = x.double() @ dequantize(q, torch.float64).T + bias.double()
    assert _rel(y, want) < (1e-6 if dtype == torch.float32 else 8e-3)


def test_fp8_w8a8_against_float64():
    """The W8A8 path of prefill on Hopper: FP8 activations with per-token scales times FP8 weights with
    per-channel scales (torch._scaled_mm, which the CPU build of torch runs too)."""
    g = torch.Generator().manual_seed(2)
    q = quantize_weight(torch.randn(64, 128, generator=g), "fp8")
    x = torch.randn(24, 128, generator=g) * torch.rand(24, 1, generator=g) * 5
    xq, sx = quantize_rows_fp8(x)
    assert sx.shape == (24, 1) and torch.allclose(sx, x.abs().amax(1, keepdim=True) / 448)
    try:
        y = fp8_linear_w8a8(x, q)
    except (RuntimeError, NotImplementedError) as e:  # torch builds without a CPU _scaled_mm
        pytest.skip(f"torch._scaled_mm does not run on this CPU build: {e}")
    want = (xq.double() * sx.double()) @ dequantize(q, torch.float64).T
    assert _rel(y, want) < 1e-6
    assert _rel(y, x.double() @ dequantize(q, torch.float64).T) < 0.06  # activation rounding (e4m3)


# ---------------------------------------------------------------------------- model
@pytest.mark.parametrize("scheme,bound", [("int8", 0.02), ("fp8", 0.06)])
def test_embedded_model_logits_within_bound(embedded, ids, scheme, bound):
    q = fastxlstm.load(MODEL, quantization=scheme)
    assert isinstance(q.backbone.blocks[0].ffn.proj_down, QuantLinear)
    assert isinstance(q.lm_head, torch.nn.Linear) and q.dtype == torch.float32
    ref, out = _logits(embedded, ids), _logits(q, ids)
    err = _rel(out, ref)
    assert 0 < err < bound, err
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > (0.95 if scheme == "int8" else 0.85)


@pytest.mark.parametrize("mode", ["single", "fused"])
@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_random_configs_compute_the_dequantized_model(mode, scheme):
    """On random configs the quantized model computes the unquantized model with its weights replaced
    by ``data * scale`` (float32). The quality bound is stated on the trained model above: random weights
    amplify weight noise through the per-head norms (int8 moves these logits by 3-15 %)."""
    cfg = CFG.replace(weight_mode=mode, embedding_dim=96, num_heads=4, num_blocks=3)
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    model, twin = perturbed_model(cfg, seed=4), perturbed_model(cfg, seed=4)
    quantize_model(model, scheme, lm_head=True)
    assert isinstance(model.lm_head, QuantLinear)
    quantized = {n: m.quant_weight() for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(quantized) == cfg.num_blocks * (5 if mode == "fused" else 10) + 1
    with torch.no_grad():
        for name, q in quantized.items():
            twin.get_submodule(name).weight.copy_(dequantize(q))
    assert _rel(_logits(model, ids), _logits(twin, ids)) < 1e-5


@pytest.mark.parametrize("scheme,bound", [("int8", 0.02), ("fp8", 0.05)])
def test_heldout_perplexity_close_to_unquantized(embedded, scheme, bound):
    from fastxlstm.tokenizer import Tokenizer
    from fastxlstm.training.evaluate import perplexity, token_stream

    stream = token_stream(Tokenizer.from_dir(MODEL), [p.read_text(encoding="utf-8")
                                                      for p in sorted(HELDOUT.glob("*.txt"))])
    base = perplexity(embedded, stream, seq_len=512, max_tokens=2048)["perplexity"]
    got = perplexity(fastxlstm.load(MODEL, quantization=scheme), stream, seq_len=512, max_tokens=2048)["perplexity"]
    assert abs(got / base - 1) < bound, (scheme, got, base)


def test_w8a8_math_on_the_embedded_model(embedded, monkeypatch):
    """The GPU's prefill math for fp8 (FP8 activations with per-token scales, W8A8) run on the CPU through
    torch._scaled_mm: held-out perplexity within 1 % of unquantized (measured +0.3 % on 1,024 tokens)."""
    import fastxlstm.model.quant as mq
    from fastxlstm.tokenizer import Tokenizer
    from fastxlstm.training.evaluate import perplexity, token_stream

    plain = mq.linear

    def w8a8(x, w, bias=None):
        if not isinstance(w, QuantWeight):
            return plain(x, w, bias)
        y = fp8_linear_w8a8(x.reshape(-1, x.shape[-1]), w).view(*x.shape[:-1], -1)
        return y if bias is None else y + bias

    stream = token_stream(Tokenizer.from_dir(MODEL), [p.read_text(encoding="utf-8")
                                                      for p in sorted(HELDOUT.glob("*.txt"))])
    base = perplexity(embedded, stream, seq_len=512, max_tokens=1024)["perplexity"]
    q = fastxlstm.load(MODEL, quantization="fp8")
    try:
        fp8_linear_w8a8(torch.ones(1, 16), quantize_weight(torch.ones(16, 16), "fp8"))
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"torch._scaled_mm does not run on this CPU build: {e}")
    monkeypatch.setattr(mq, "linear", w8a8)
    got = perplexity(q, stream, seq_len=512, max_tokens=1024)["perplexity"]
    assert abs(got / base - 1) < 0.01, (got, base)


# ------------------------------------------------------------------------ save / load
@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_save_load_round_trip_bitwise(tmp_path, scheme):
    model = quantize_model(perturbed_model(CFG.replace(weight_mode="fused"), seed=2), scheme, lm_head=True)
    model.save_pretrained(str(tmp_path / "q"))
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "fastxlstm" and qc["scheme"] == scheme and qc["quantize_lm_head"] is True
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("backbone.blocks.0.mlstm_layer.q.weight").dtype == model.lm_head.weight.dtype
        assert f.get_tensor("backbone.blocks.0.mlstm_layer.q.weight_scale").dtype == torch.float32
    assert "backbone.blocks.1.ffn.proj_up.weight_scale" in keys and "lm_head.weight_scale" in keys
    ids = torch.randint(0, CFG.vocab_size, (2, 30), generator=torch.Generator().manual_seed(3))
    for mode in ("fused", "single"):
        again = fastxlstm.load(tmp_path / "q", weight_mode=mode)
        assert fastxlstm.load(tmp_path / "q", quantization=scheme).config.extra["quantization_config"] == qc
        assert torch.equal(_logits(again, ids), _logits(model, ids)) or mode == "single"
        if mode == "fused":
            mine, theirs = model.state_dict(), again.state_dict()
            assert mine.keys() == theirs.keys()
            for k in mine:
                assert mine[k].dtype == theirs[k].dtype and torch.equal(mine[k].view(torch.uint8),
                                                                        theirs[k].view(torch.uint8)), k
    # saving again from the single-layout load writes the same tensors
    fastxlstm.load(tmp_path / "q", weight_mode="single").save_pretrained(str(tmp_path / "q2"))
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "q2" / "model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():
            assert torch.equal(a.get_tensor(k).view(torch.uint8), b.get_tensor(k).view(torch.uint8)), k


def test_load_time_quantization_equals_quantizing_the_loaded_model(tmp_path):
    model = perturbed_model(CFG, seed=5)
    model.save_pretrained(str(tmp_path / "m"))
    for scheme in ("int8", "fp8"):
        a = fastxlstm.load(tmp_path / "m", quantization=scheme, weight_mode="fused", quantize_lm_head=True)
        b = quantize_model(fastxlstm.load(tmp_path / "m", weight_mode="fused"), scheme, lm_head=True)
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k].view(torch.uint8), sb[k].view(torch.uint8))
                   for k in sa)
        assert a.config.extra == b.config.extra


def test_quantized_save_is_smaller_and_dtype_leaves_quantized_tensors(tmp_path):
    model = perturbed_model(CFG.replace(embedding_dim=256), seed=6)
    model.save_pretrained(str(tmp_path / "f32"))
    quantize_model(model, "int8")
    model.save_pretrained(str(tmp_path / "q"), dtype=torch.bfloat16)
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("backbone.blocks.0.ffn.proj_down.weight").dtype == torch.int8
        assert f.get_tensor("backbone.blocks.0.ffn.proj_down.weight_scale").dtype == torch.float32
        assert f.get_tensor("backbone.embeddings.weight").dtype == torch.bfloat16
    size = (tmp_path / "q" / "model.safetensors").stat().st_size
    assert size < 0.45 * (tmp_path / "f32" / "model.safetensors").stat().st_size


# ------------------------------------------------------------------------------ engine
@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_engine_on_quantized_model_matches_its_forward(scheme):
    """The engine fuses the quantized projections (data and scales by rows) and gives the quantized
    model's own logits and greedy tokens."""
    from fastxlstm.engine import LLM

    cfg = CFG.replace(weight_mode="single", num_heads=4)
    model = perturbed_model(cfg, seed=7)
    prompt = list(range(5, 40))
    llm = LLM(model, max_slots=2, quantization=scheme)
    assert isinstance(llm.engine.runner.layers[0].w_in, QuantWeight)
    out = llm.generate([prompt, prompt[:20]], max_new_tokens=8, temperature=0.0, ignore_eos=True)
    for res, p in zip(out, (prompt, prompt[:20])):
        ids, state, want = torch.tensor([p]), None, []
        with torch.no_grad():
            logits, state = model(ids)
            for _ in range(8):
                want.append(int(logits[0, -1].argmax()))
                logits, state = model(torch.tensor([[want[-1]]]), state)
        assert res.token_ids == want


# ------------------------------------------------------------------------------ errors
def test_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        fastxlstm.load(MODEL, quantization="int4")
    model = quantize_model(perturbed_model(CFG), "int8")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, "fp8")
    model.save_pretrained(str(tmp_path / "q"))
    with pytest.raises(ValueError, match="holds int8-quantized weights"):
        fastxlstm.load(tmp_path / "q", quantization="fp8")
    with pytest.raises(ValueError, match="tied"):
        quantize_model(perturbed_model(CFG.replace(tie_word_embeddings=True)), "int8", lm_head=True)
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (tmp_path / "q" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="quant_method 'bitsandbytes' is not supported"):
        fastxlstm.load(tmp_path / "q")
    cfg["quantization_config"] = {"quant_method": "fastxlstm", "scheme": "fp8", "granularity": "per_channel"}
    (tmp_path / "q" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(fastxlstm.checkpoint.CheckpointError, match="is torch.int8.*needs torch.float8_e4m3fn"):
        fastxlstm.load(tmp_path / "q")
    # FP8 on a GPU without FP8 (an A100: sm_80)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA A100")
    with pytest.raises(ValueError, match=r"compute capability >= 8.9.*A100 is sm_80.*int8"):
        fastxlstm.load(MODEL, device="cuda:0", quantization="fp8")


def test_cli_quantization_options(monkeypatch):
    """``fastxlstm serve --quantization`` reaches the loader (a bad name is a usage error naming it, exit 2, no
    traceback);
    ``fastxlstm bench --quantization`` accepts bf16 / fp8 / int8 only."""
    import uvicorn
    from typer.testing import CliRunner

    from fastxlstm.cli import app

    def no_server(*args, **kwargs):
        raise SystemExit(3)  # the option was ignored: the model loaded and the server would start

    monkeypatch.setattr(uvicorn, "run", no_server)
    cli = CliRunner()
    res = cli.invoke(app, ["serve", "--model", str(MODEL), "--quantization", "int4", "--device", "cpu"])
    assert res.exit_code == 2 and "unknown quantization 'int4'" in res.output and "Traceback" not in res.output
    res = cli.invoke(app, ["bench", "--quantization", "bf16,fp4"])
    assert res.exit_code != 0 and "fp4" in res.output


def test_bench_quantized_variant_and_table(tmp_path):
    """``fastxlstm bench --quantization``'s set-up of a quantized variant (run here on the CPU with a small
    model: the benchmark itself needs a GPU) records the KL from bf16, and the side-by-side table reads it."""
    from fastxlstm.bench.common import Plan, Recorder
    from fastxlstm.bench.quant import quantize_against_bf16
    from fastxlstm.bench.report import markdown_quant

    model = perturbed_model(CFG.replace(weight_mode="fused"), seed=8)
    rec = Recorder("fastxlstm-int8", tmp_path / "r.json", 60)
    out = quantize_against_bf16(model, "int8", Plan(), rec)
    assert out is model and isinstance(model.backbone.blocks[0].ffn.proj_down, QuantLinear)
    q = rec.data["quantization"]
    assert 0 < q["kl_vs_bf16_prefill"] < 0.05 and 0 < q["kl_vs_bf16_decode_b1"] < 0.05, q
    assert 0.5 < q["top1_agree_prefill"] <= 1 and 0.5 < q["top1_agree_decode_b1"] <= 1, q
    base = {"decode": [{"batch": 1, "tok_s": 100.0}], "ttft": [{"prompt_len": 2048, "ms": 50.0, "peak_gb": 14.0}],
            "weights_gb": 13.7}
    fp8 = {"decode": [{"batch": 1, "tok_s": 150.0}], "ttft": [{"prompt_len": 2048, "ms": 40.0, "peak_gb": 7.0}],
           "weights_gb": 7.0, "quantization": q}
    table = markdown_quant({"systems": {"fastxlstm": base, "fastxlstm-fp8": fp8}})
    assert "| decode tok/s, batch 1 | 100 | 150 | 1.50x |" in table
    assert "| TTFT ms, prompt 2k | 50.0 | 40.0 | 1.25x |" in table and "kl_vs_bf16_prefill" in table
