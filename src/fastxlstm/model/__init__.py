"""The xLSTM 7B model family."""

from .xlstm import XLSTMBlock, XLSTMForCausalLM, build_model

__all__ = ["XLSTMBlock", "XLSTMForCausalLM", "build_model"]
