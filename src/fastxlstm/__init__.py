"""fastxlstm: fast inference, serving and training for xLSTM language models."""

from .checkpoint import load, save_pretrained
from .config import PRESETS, XLSTMConfig, preset
from .engine import LLM as LLM
from .model import XLSTMForCausalLM, build_model

__version__ = "0.1.0"

__all__ = [
    "XLSTMConfig", "XLSTMForCausalLM", "PRESETS", "preset", "build_model", "load", "save_pretrained", "__version__",
]
