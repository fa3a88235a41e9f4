"""Streaming detokenisation with stop strings: text pieces that never leak a stop string.

One implementation for the server (:mod:`fastxlstm.serving.call`) and ``LLM.generate`` / ``LLM.stream``
(:mod:`fastxlstm.engine.llm`). Tokens are fed with :meth:`StopText.add`; :meth:`StopText.ready` returns the
text that is safe to send. Text that could still be the start of a stop string (the longest suffix that is a
proper prefix of one) is held back until it is clear either way; when a stop string appears the text is cut
before it (or after it, with ``include_stop``). This module imports nothing of the package (the tokenizer is
passed in), so every layer can use it.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopText:
    """Text of one sequence, fed token by token (``tokenizer=None``: no text, never stops)."""

    __slots__ = ("decoder", "stops", "include_stop", "max_stop", "text", "sent", "stopped")

    def __init__(self, tokenizer, stops: Sequence[str] | None = None, include_stop: bool = False):
        self.decoder = tokenizer.incremental_decoder() if tokenizer is not None else None
        self.stops = [s for s in (stops or ())]
        if any(not s for s in self.stops):
            raise ValueError("stop strings must be non-empty")
        self.include_stop = include_stop
        self.max_stop = max((len(s) for s in self.stops), default=0)
        self.text = ""  # the text so far (cut at the stop string once one appeared)
        self.sent = 0  # characters handed out by ready()
        self.stopped = False

    def add(self, token: int, special: bool = False) -> bool:
        """Feed one token (``special`` tokens add no text); True once a stop string appeared."""
        if not self.stopped and not special and self.decoder is not None:
            self._append(self.decoder.add(token))
        return self.stopped

    def finish(self) -> None:
        """End of generation: take the decoder's held-back bytes (still checked for stops)."""
        if not self.stopped and self.decoder is not None:
            self._append(self.decoder.flush())

    def ready(self, final: bool = False) -> str:
        """The text not handed out yet that is safe to send (``final``: everything)."""
        end = len(self.text)
        if not (final or self.stopped):
            end -= self._held_back()
        piece = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return piece

    def _append(self, piece: str) -> None:
        if not piece:
            return
        # a stop string first complete now ends inside ``piece``: it starts at most max_stop - 1 chars before it
        start = max(0, len(self.text) - self.max_stop + 1)
        self.text += piece
        if not self.stops:
            return
        best: tuple[int, int] | None = None
        for stop in self.stops:
            idx = self.text.find(stop, start)
            if idx >= 0 and (best is None or idx < best[0]):
                best = (idx, len(stop))
        if best is not None:
            cut = best[0] + (best[1] if self.include_stop else 0)
            self.text = self.text[:max(cut, self.sent)]
            self.stopped = True

    def _held_back(self) -> int:
        """Length of the longest unsent suffix of the text that is a proper prefix of a stop string."""
        text = self.text
        for length in range(min(self.max_stop - 1, len(text) - self.sent), 0, -1):
            tail = text[-length:]
            if any(stop.startswith(tail) for stop in self.stops):
                return length
        return 0
