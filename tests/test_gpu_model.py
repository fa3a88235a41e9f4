"""GPU: the model in bf16 on CUDA (default backend) agrees with the float32 CPU model; greedy tokens
of the GPU path equal those of a float32 GPU run on the same weights."""

from __future__ import annotations

import pytest
import torch

from fastxlstm.config import XLSTMConfig

from .helpers import greedy_reference as generate
from .helpers import perturbed_model

pytestmark = pytest.mark.gpu


def test_bf16_cuda_logits_close_to_fp32_cpu():
    """bf16 on CUDA (the Triton kernels) against the float32 CPU model, next to the same bf16 weights run through
    the reference (pure PyTorch) math: the kernels must add little to bf16's own error. Measured on the H200
    (2026-12-03, 12 seeds of this shape): Triton 0.025-0.033 relative, the bf16 reference 0.025-0.033, the two
    within 16% of each other (seed 0, the one used here by conftest's seeding: 0.0308 vs 0.0267)."""
    cfg = XLSTMConfig(vocab_size=1024, embedding_dim=512, num_blocks=2, num_heads=2, weight_mode="fused")
    cpu = perturbed_model(cfg)
    gpu = perturbed_model(cfg).to("cuda", torch.bfloat16)
    ids = torch.randint(0, cfg.vocab_size, (2, 300))
    with torch.no_grad():
        ref, _ = cpu(ids)
        out, _ = gpu(ids.cuda())
        gpu.set_backend("reference")
        out_ref, _ = gpu(ids.cuda())
        gpu.set_backend("auto")
    rel = ((out.float().cpu() - ref).norm() / ref.norm()).item()
    rel_bf16 = ((out_ref.float().cpu() - ref).norm() / ref.norm()).item()
    assert torch.isfinite(out).all()
    assert rel < 4.5e-2, rel  # bf16's own error at this shape, with a margin over the measured 0.033
    assert rel < 1.3 * rel_bf16 + 2e-3, (rel, rel_bf16)  # the kernels no worse than bf16 reference math


def test_fp32_cuda_greedy_equals_cpu():
    cfg = XLSTMConfig(vocab_size=512, embedding_dim=256, num_blocks=2, num_heads=2, weight_mode="fused")
    cpu = perturbed_model(cfg)
    gpu = perturbed_model(cfg).cuda()
    gpu.set_backend("reference")  # same float32 math on another device (Triton's fp32 dots may use tf32)
    prompt = list(range(3, 40))
    a = generate(cpu, prompt, max_new_tokens=16)[0].tolist()
    b = generate(gpu, prompt, max_new_tokens=16)[0].cpu().tolist()
    assert a == b
