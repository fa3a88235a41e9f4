"""fastxlstm: fast inference, serving and training for xLSTM language models."""

from .config import PRESETS, XLSTMConfig, preset

__version__ = "0.1.0"

__all__ = ["XLSTMConfig", "PRESETS", "preset", "__version__"]
