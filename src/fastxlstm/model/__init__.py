"""The xLSTM 7B model family."""

from .xlstm import ModelState, XLSTMBlock, XLSTMForCausalLM, build_model

__all__ = ["ModelState", "XLSTMBlock", "XLSTMForCausalLM", "build_model"]
