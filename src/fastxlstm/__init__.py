"""fastxlstm: fast inference, serving and training for xLSTM language models."""

from .checkpoint import load, save_pretrained
from .config import PRESETS, XLSTMConfig, preset
from .engine import LLM, GenerationResult, SamplingParams, SequenceState
from .model import XLSTMForCausalLM, build_model

__version__ = "0.1.0"  # the package's version (pyproject.toml reads it from here)

__all__ = [
    "LLM", "GenerationResult", "SamplingParams", "SequenceState", "XLSTMConfig", "XLSTMForCausalLM", "PRESETS",
    "preset", "build_model", "load", "save_pretrained", "__version__",
]
