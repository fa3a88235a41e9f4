"""Streaming detokenisation with stop strings: text deltas that never leak a stop string.

Text that could be the start of a stop string is held back until it is clear either way;
when a stop string appears the text is cut before it (or after it, with
``include_stop_str_in_output``).
"""

from __future__ import annotations

from ..tokenizer import Tokenizer


class ChoiceText:
    """Text of one choice, fed token by token."""

    def __init__(self, tokenizer: Tokenizer, stops: list[str] | None = None, include_stop: bool = False):
        self.decoder = tokenizer.incremental_decoder()
        self.stops = list(stops or [])
        self.include_stop = include_stop
        self.max_stop = max((len(s) for s in self.stops), default=0)
        self.text = ""
        self.sent = 0
        self.stopped = False

    def add(self, token: int, special: bool = False) -> str:
        """Feed one token (``special`` tokens add no text); return the text now safe to send."""
        if self.stopped:
            return ""
        if not special:
            self.text += self.decoder.add(token)
        return self._emit(final=False)

    def finish(self) -> str:
        """End of generation: flush held-back text."""
        if self.stopped:
            return ""
        self.text += self.decoder.flush()
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        safe = len(self.text)
        if self.stops:
            start = max(0, self.sent - self.max_stop)
            best: tuple[int, str] | None = None
            for stop in self.stops:
                idx = self.text.find(stop, start)
                if idx >= 0 and (best is None or idx < best[0]):
                    best = (idx, stop)
            if best is not None:
                cut = best[0] + (len(best[1]) if self.include_stop else 0)
                self.text = self.text[:max(cut, self.sent)]
                self.stopped = True
                safe = len(self.text)
            elif not final:
                safe -= self._held_back()
        delta = self.text[self.sent:safe]
        self.sent = safe
        return delta

    def _held_back(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop string."""
        text = self.text
        for length in range(min(self.max_stop - 1, len(text) - self.sent), 0, -1):
            tail = text[-length:]
            if any(stop.startswith(tail) for stop in self.stops):
                return length
        return 0
