"""Token generation: the v0 loop and sampling."""

from .sampling import filter_logits, sample
from .simple import as_batch, generate, generate_stream

__all__ = ["as_batch", "filter_logits", "generate", "generate_stream", "sample"]
