"""Config: reads the released 7B config.json unchanged, writes one transformers reads, presets."""

from __future__ import annotations

import json

import pytest
import torch

from fastxlstm.config import PRESETS, XLSTMConfig, preset

# Fields of the released NX-AI/xLSTM-7b config.json (as published; includes keys we do not use).
RELEASED_7B = {
    "architectures": ["xLSTMForCausalLM"], "add_embedding_dropout": False, "add_forward_backend_padding": False,
    "add_out_norm": True, "add_post_blocks_norm": True, "add_post_norm": False, "add_qk_norm": False,
    "bos_token_id": 0, "cell_norm_eps": 1e-06, "chunk_size": 64, "chunkwise_kernel": "chunkwise--triton_xl_chunk",
    "embedding_dim": 4096, "eos_token_id": 2, "ffn_proj_factor": 2.667, "ffn_round_up_to_multiple_of": 64,
    "force_bos_token_insert": True, "gate_soft_cap": 15.0, "igate_bias_init_range": -10.0,
    "inference_state_dtype": "float32", "max_inference_chunksize": 16384, "mlstm_round_up_to_multiple_of": 64,
    "mode": "inference", "model_type": "xlstm", "norm_eps": 1e-06, "norm_reduction_force_float32": True,
    "num_blocks": 32, "num_heads": 8, "output_logit_soft_cap": 30.0, "pad_token_id": 1, "qk_dim_factor": 0.5,
    "return_last_states": True, "sequence_kernel": "native_sequence__triton", "step_kernel": "triton",
    "tie_word_embeddings": False, "torch_dtype": "float32", "use_bias": False, "use_cache": True,
    "v_dim_factor": 1.0, "vocab_size": 50304, "weight_mode": "single",
}


def test_reads_released_config_unchanged(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(RELEASED_7B))
    cfg = XLSTMConfig.from_json(tmp_path / "config.json")
    assert cfg == preset("xlstm-7b").replace(extra=cfg.extra)
    assert (cfg.qk_head_dim, cfg.v_head_dim, cfg.ffn_dim) == (256, 512, 10944)
    assert cfg.extra["force_bos_token_insert"] is True
    written = cfg.to_dict()
    for key, value in RELEASED_7B.items():
        if key not in ("chunkwise_kernel", "sequence_kernel", "step_kernel"):
            assert written[key] == value, key
    assert abs(cfg.num_parameters() - 6.865e9) < 1e7


def test_transformers_reads_written_config(tmp_path):
    from transformers import AutoConfig

    cfg = XLSTMConfig(embedding_dim=256, num_blocks=3, num_heads=4, vocab_size=1000, gate_soft_cap=10.0)
    cfg.to_json(tmp_path / "config.json")
    hf = AutoConfig.from_pretrained(tmp_path)
    assert (hf.hidden_size, hf.num_hidden_layers, hf.num_heads, hf.vocab_size) == (256, 3, 4, 1000)
    assert hf.gate_soft_cap == 10.0 and hf.weight_mode == "single"
    assert XLSTMConfig.from_dict(hf.to_dict()).embedding_dim == 256


def test_hf_aliases_and_round_trip():
    cfg = XLSTMConfig.from_dict({"hidden_size": 64, "num_hidden_layers": 2, "num_heads": 2, "vocab_size": 10})
    assert (cfg.embedding_dim, cfg.num_blocks) == (64, 2)
    assert XLSTMConfig.from_dict(cfg.to_dict()) == cfg.replace(extra=XLSTMConfig.from_dict(cfg.to_dict()).extra)


def test_dims_are_truncated_like_the_official_code():
    cfg = XLSTMConfig(embedding_dim=96, num_heads=2, qk_dim_factor=0.5, vocab_size=10)
    # 96 * 2.667 = 256.03: int((256.03 + 63) // 64 * 64) = 256 in the official code (ceil would give 320)
    assert cfg.qk_dim == 48 and cfg.v_dim == 96 and cfg.ffn_dim == 256


@pytest.mark.parametrize("dim,factor", [(768, 2.667), (96, 2.667), (4096, 2.667), (2048, 2.667), (1024, 2.667),
                                        (256, 2.667), (192, 1.34), (64, 1.0), (128, 1.5), (200, 2.0), (333, 2.667),
                                        (640, 1.3333), (3072, 2.667)])
def test_ffn_width_is_transformers_own(dim, factor):
    """The FFN width transformers' xLSTMFeedForward builds (the official rule, on the float product)."""
    from transformers import xLSTMConfig
    from transformers.models.xlstm.modeling_xlstm import xLSTMFeedForward

    ours = XLSTMConfig(embedding_dim=dim, num_heads=1, ffn_proj_factor=factor, vocab_size=10)
    with torch.device("meta"):
        theirs = xLSTMFeedForward(xLSTMConfig(hidden_size=dim, num_heads=1, ffn_proj_factor=factor, vocab_size=10))
    assert ours.ffn_dim == theirs.up_proj_dim


def test_xlstm_125m_preset_has_the_official_ffn_width():
    assert preset("xlstm-125m").ffn_dim == 2048  # 768 * 2.667 = 2048.26 (ceil gave 2112)


@pytest.mark.parametrize("field,value", [
    ("num_heads", "2"), ("num_heads", True), ("num_heads", 2.0), ("num_blocks", 0), ("embedding_dim", -64),
    ("vocab_size", None), ("vocab_size", [10]), ("chunk_size", -1), ("qk_dim_factor", "0.5"), ("qk_dim_factor", 0),
    ("v_dim_factor", float("inf")), ("ffn_proj_factor", -1.0), ("qk_dim_factor", 1e-6), ("eps", 0.0), ("eps", -1e-6),
    ("eps", 2.0), ("norm_eps", float("nan")), ("norm_eps", "1e-6"), ("gate_soft_cap", 0.0), ("gate_soft_cap", -15.0),
    ("output_logit_soft_cap", float("nan")), ("output_logit_soft_cap", "30"), ("use_bias", "false"),
    ("use_bias", 1), ("add_out_norm", None), ("tie_word_embeddings", "no"), ("bos_token_id", -1),
    ("pad_token_id", "1"), ("eos_token_id", 2.5), ("ffn_round_up_to_multiple_of", 0), ("weight_mode", ["single"]),
])
def test_bad_field_values_name_the_field_and_file(tmp_path, field, value):
    data = {"embedding_dim": 64, "num_heads": 2, "num_blocks": 1, "vocab_size": 10, field: value}
    if value is None:  # JSON null: from_dict drops it for most fields; the constructor does not
        with pytest.raises(ValueError, match=field):
            XLSTMConfig(**{**data, field: value})
        return
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"config\.json: .*{field}"):
        XLSTMConfig.from_json(tmp_path / "config.json")


def test_non_object_config_is_named(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config\.json: a config must be a JSON object"):
        XLSTMConfig.from_json(tmp_path / "config.json")


def test_bad_configs_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="weight_mode"):
        XLSTMConfig(weight_mode="split")
    with pytest.raises(ValueError, match="divisible by num_heads"):
        XLSTMConfig(embedding_dim=100, num_heads=3)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        XLSTMConfig.from_json(tmp_path / "config.json")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type"):
        XLSTMConfig.from_json(tmp_path / "config.json")


def test_presets():
    assert set(PRESETS) >= {"xlstm-7b", "xlstm-125m", "xlstm-350m", "xlstm-1.3b", "xlstm-tiny"}
    sizes = {name: preset(name).num_parameters() for name in PRESETS}
    assert sizes["xlstm-tiny"] < sizes["xlstm-125m"] < sizes["xlstm-350m"] < sizes["xlstm-1.3b"] < sizes["xlstm-7b"]
    with pytest.raises(KeyError, match="unknown preset"):
        preset("xlstm-9000b")
