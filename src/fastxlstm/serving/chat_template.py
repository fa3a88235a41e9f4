"""Chat templates: the model directory's (``tokenizer_config.json`` ``chat_template`` or
``chat_template.jinja``), one given with ``fastxlstm serve --chat-template FILE``, rendered like transformers does
with sandboxed Jinja2 (``messages``, ``tools``, ``add_generation_prompt``, the special tokens and the request's
``chat_template_kwargs``), or a default.

The default template (for base models such as xLSTM 7B, which ship none) is plain text::

    System: {system}\\n\\nUser: {user}\\n\\nAssistant: {assistant}\\n\\nUser: {user}\\n\\nAssistant:

With tools, a first ``System:`` turn lists them (their JSON) and asks for ``<tool_call>{"name": ..., "arguments":
...}</tool_call>``; an assistant turn that called tools shows those calls in that form, and tool results are
``Tool:`` turns. A base model continues a dialogue with the next ``User:`` turn, so the default template's
generations stop at ``\\nUser:`` (:attr:`ChatTemplate.stop`; not part of the answer).

Message contents are stripped; the generation prompt ``Assistant:`` has no trailing space, so a
byte-level BPE tokenizes each rendered turn as a token prefix of the next one (which is what
lets the prefix cache reuse the previous turn's state).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

DEFAULT_CHAT_TEMPLATE = (
    "{%- if tools -%}System: You can call these tools (JSON schemas of their arguments): "
    "{{ tools | tojson }}. To call one, answer with "
    "<tool_call>{\"name\": the tool's name, \"arguments\": its arguments}</tool_call>.{{ '\\n\\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] in ('system', 'developer') -%}System: "
    "{%- elif message['role'] == 'user' -%}User: "
    "{%- elif message['role'] == 'tool' -%}Tool: "
    "{%- else -%}Assistant: {%- endif -%}"
    "{{ ' ' + message['content'] | trim }}"
    "{%- for call in message.get('tool_calls') or [] -%}"
    "<tool_call>{{ {'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson }}"
    "</tool_call>{%- endfor -%}"
    "{%- if not (loop.last and continue_final_message) -%}{{ '\\n\\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}Assistant:{%- endif -%}"
)
DEFAULT_STOP = ("\nUser:",)  # the default template's next user turn


class ChatTemplateError(ValueError):
    """The template failed to render these messages (a 400 for the client)."""


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


class ChatTemplate:
    """Renders a list of ``{"role", "content"}`` messages to prompt text."""

    def __init__(self, source: str | None = None, special_tokens: dict[str, str | None] | None = None,
                 origin: str = "default"):
        self.source = source or DEFAULT_CHAT_TEMPLATE
        self.origin = origin if source else "default"
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.stop: tuple[str, ...] = () if source else DEFAULT_STOP  # stop strings every chat answer gets
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent,
                                                                                       ensure_ascii=ensure_ascii)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self.template = env.from_string(self.source)
        except TemplateError as e:
            raise ValueError(f"invalid chat template ({self.origin}): {e}") from e

    @classmethod
    def from_model_dir(cls, directory: str | os.PathLike | None) -> ChatTemplate:
        """The directory's template when it has one, else the default."""
        if directory is None:
            return cls()
        directory = Path(directory)
        config_path = directory / "tokenizer_config.json"
        config = {}
        if config_path.exists():
            try:
                config = json.loads(config_path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{config_path} is not valid JSON: {e}") from e
        specials = {name: _token_text(config.get(name)) for name in ("bos_token", "eos_token", "pad_token",
                                                                       "unk_token")}
        jinja_path = directory / "chat_template.jinja"
        source = config.get("chat_template")
        origin = str(config_path)
        if isinstance(source, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default") or next(iter(named.values()), None)
        if not source and jinja_path.exists():
            source, origin = jinja_path.read_text(), str(jinja_path)
        return cls(source, specials, origin)

    def stops(self, extra: Sequence[str] = ()) -> list[str]:
        """The stop strings of a chat answer: ``extra`` (the request's or the user's), then the template's own
        (:attr:`stop`: the default template's next user turn). The server and ``fastxlstm chat`` both use it."""
        return [*extra, *self.stop]

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True,
               continue_final_message: bool = False, tools: list[dict] | None = None, **kwargs) -> str:
        """The prompt text; ``kwargs`` (a request's ``chat_template_kwargs``) are extra template variables."""
        try:
            text = self.template.render(**{**self.special_tokens, **kwargs}, messages=list(messages), tools=tools,
                                        add_generation_prompt=add_generation_prompt,
                                        continue_final_message=continue_final_message)
        except ChatTemplateError:
            raise
        except Exception as e:  # noqa: BLE001 - template bugs are reported to the client, not crash the server
            raise ChatTemplateError(f"the chat template failed on these messages: {type(e).__name__}: {e}") from e
        if continue_final_message and messages:
            final = messages[-1]["content"].strip()
            idx = text.rfind(final) if final else len(text.rstrip())
            if idx >= 0:
                text = text[: idx + len(final)]
        return text
