"""``fastxlstm chat``: a multi-turn chat REPL on :class:`fastxlstm.LLM`, with the server's chat template.

Each turn continues the recurrent state the previous reply ended in: only the new turn's tokens are
prefilled, never the history (constant cost per turn, however long the conversation). The prompt of a
turn is the conversation rendered by the chat template (:class:`~fastxlstm.serving.chat_template.ChatTemplate`,
the one ``fastxlstm serve`` uses); when the tokens the state has seen (the previous prompt and the reply as
generated) are a token prefix of it, the rest of its tokens are fed, which gives exactly the tokens a
stateless client re-sending the whole conversation to the server gets. Otherwise (the reply as generated
differs from its rendering: the template trims it, or it ended in an EOS token or a stop string the template
does not write) what the template writes after the reply's text (the conversation rendered with
``continue_final_message``) is fed, less the whitespace and stop string the reply ended in (the state has
seen them). Only when
the template renders the history as something else altogether does a turn start from a fresh state (the
whole conversation prefilled). Replies stop at the template's stop strings as the server's chat answers do
(:meth:`~fastxlstm.serving.chat_template.ChatTemplate.stops`: the default template's next user turn, ``\nUser:``),
besides the user's own (``--stop``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Generator, Iterable
from typing import TextIO

from .engine import LLM, GenerationResult, SequenceState
from .sampling import SamplingParams

COMMANDS = {"/reset": "forget the conversation (and its state)", "/exit": "quit (also /quit, end of input)"}


class ChatSession:
    """Messages and the recurrent state after the last reply. ``send(text)`` streams the reply's text and
    returns its :class:`~fastxlstm.engine.GenerationResult`; ``reset()`` starts over."""

    def __init__(self, llm: LLM, template, params: SamplingParams, system: str | None = None):
        if llm.tokenizer is None:
            raise ValueError("chat needs a model with a tokenizer")
        # the template's stop strings too (the default one's next user turn), as the server's chat answers have them
        params = dataclasses.replace(params, stop=template.stops(params.stop))
        self.llm, self.template, self.params, self.system = llm, template, params, system
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict[str, str]] = [{"role": "system", "content": self.system}] if self.system else []
        self.state: SequenceState | None = None
        self.prefilled: list[int] = []  # prompt tokens fed per turn (what the last turns cost)
        self._tail = ""  # what the last reply generated after its trimmed text (whitespace, a stop string)

    def _turn_prompt(self, messages: list[dict[str, str]]) -> tuple[list[int], SequenceState | None]:
        text = self.template.render(messages, add_generation_prompt=True)
        tok = self.llm.tokenizer
        ids = tok.encode(text)
        if self.state is None:
            return ids, None
        seen = list(self.state.token_ids)
        if ids[:len(seen)] == seen and len(ids) > len(seen):
            return ids[len(seen):], self.state
        before = self.template.render(self.messages, add_generation_prompt=False, continue_final_message=True)
        if not (text.startswith(before) and len(text) > len(before)):
            return ids, None  # the template renders the history differently now: start from a fresh state
        rest, tail = text[len(before):], self._tail  # the state has seen the tail already: not again
        if tail and rest.startswith(tail):
            rest = rest[len(tail):]
        elif tail.strip() and tail.strip() in rest and not rest[:rest.index(tail.strip())].strip():
            rest = rest[rest.index(tail.strip()) + len(tail.strip()):]
        return tok.encode(rest, add_bos=False), self.state

    def send(self, text: str) -> Generator[str, None, GenerationResult]:
        messages = [*self.messages, {"role": "user", "content": text}]
        ids, state = self._turn_prompt(messages)
        gen = self.llm.stream(ids, self.params, state=state, return_state=True)
        while True:
            try:
                yield next(gen)
            except StopIteration as done:
                result: GenerationResult = done.value
                break
        self.prefilled.append(len(ids))
        self.messages = [*messages, {"role": "assistant", "content": result.text}]
        generated, reply = self.llm.tokenizer.decode(result.token_ids), result.text
        self._tail = reply[len(reply.rstrip()):] + (generated[len(reply):] if generated.startswith(reply) else "")
        if result.state is None:  # nothing generated (max_new_tokens 0): the prompt alone is what was seen
            self.state = self.llm.prefill(ids, state=state)
        else:
            self.state = result.state
        return result


def repl(session: ChatSession, lines: Iterable[str], out: TextIO, prompt: str = "") -> None:
    """Read user turns from ``lines`` (``/reset``, ``/exit``), stream each reply to ``out``."""
    it = iter(lines)
    while True:
        if prompt:
            out.write(prompt)
            out.flush()
        line = next(it, None)
        if line is None:
            return
        text = line.rstrip("\n")
        command = text.strip().lower()
        if command in ("/exit", "/quit"):
            return
        if command == "/reset":
            session.reset()
            out.write("(conversation reset)\n")
            continue
        if command in ("/help", "/?"):
            out.write("".join(f"{k}: {v}\n" for k, v in COMMANDS.items()))
            continue
        if not text.strip():
            continue
        for piece in session.send(text):
            out.write(piece)
            out.flush()
        out.write("\n")
        out.flush()
