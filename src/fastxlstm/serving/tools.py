"""OpenAI tool calling over the chat template.

``tool_choice`` ``required`` or a named function: the answer is constrained JSON (the grammar of
:func:`tool_spec`): ``{"name": ..., "arguments": {...}}`` over the tools' argument schemas (required), or the
named function's arguments themselves; it is always one call. ``auto`` (the default when tools are given):
the model answers freely; an answer that starts with ``<tool_call>`` (the form the default template asks for,
and the Hermes / Qwen templates use) is read as one or more ``<tool_call>{"name", "arguments"}</tool_call>``
blocks naming given tools; any other answer is content. ``none``: tools are not offered."""

from __future__ import annotations

import json
import re
import uuid

from .structured import MAX_SCHEMA_DEPTH, GrammarSpec, StructuredError, json_spec, schema_depth

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.S)


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _params(fn) -> dict:
    return fn.parameters if fn.parameters else {"type": "object", "properties": {}}


def _hoist(name: str, params: dict, defs: dict) -> dict:
    """``params`` with its ``$defs`` / ``definitions`` moved into ``defs`` (as ``name__X``) and its local
    references rewritten, so that it can sit inside a larger schema."""
    if schema_depth(params) > MAX_SCHEMA_DEPTH:
        raise StructuredError(f"tools: the parameters of {name} nest deeper than {MAX_SCHEMA_DEPTH} levels", "tools")
    params = dict(params)
    own = {**params.pop("$defs", {}), **params.pop("definitions", {})}

    def fix(v):
        if isinstance(v, dict):
            return {k: (re.sub(r"^#/(\$defs|definitions)/", f"#/$defs/{name}__", x)
                        if k == "$ref" and isinstance(x, str) else fix(x)) for k, x in v.items()}
        return [fix(x) for x in v] if isinstance(v, list) else v

    defs.update({f"{name}__{k}": fix(v) for k, v in own.items()})
    return fix(params)


def forced_name(body) -> str | None:
    """The function a named ``tool_choice`` forces (its answer is the arguments object), else None."""
    choice = body.tool_choice
    return None if choice is None or isinstance(choice, str) else choice.function.name


def tool_spec(body) -> GrammarSpec | None:
    """The grammar of a chat request's tool choice: None unless ``required`` or a named function."""
    if not body.tools or body.tool_choice in (None, "none", "auto"):
        return None
    name = forced_name(body)
    if name is not None:
        fn = next(t.function for t in body.tools if t.function.name == name)
        return json_spec(_params(fn), "tools")
    defs: dict = {}
    one_of = [{"type": "object", "properties": {"name": {"const": t.function.name},
                                                "arguments": _hoist(t.function.name, _params(t.function), defs)},
               "required": ["name", "arguments"], "additionalProperties": False} for t in body.tools]
    return json_spec({"anyOf": one_of, **({"$defs": defs} if defs else {})}, "tools")


def _call(name: str, arguments) -> dict:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": call_id(), "type": "function", "function": {"name": name, "arguments": args}}


def parse_answer(text: str, body) -> tuple[str | None, list[dict] | None]:
    """``(content, tool_calls)`` of a finished answer to a chat request with tools on."""
    name = forced_name(body)
    if name is not None:
        return None, [_call(name, text)]
    if body.tool_choice == "required":
        try:
            obj = json.loads(text)
            return None, [_call(obj["name"], obj["arguments"])]
        except (json.JSONDecodeError, KeyError, TypeError):  # cut by max_tokens: the text as content
            return text, None
    if not text.lstrip().startswith(OPEN):
        return text, None
    names = {t.function.name for t in body.tools}
    calls = []
    for block in _BLOCK.findall(text):
        try:
            obj = json.loads(block)
        except json.JSONDecodeError:
            return text, None
        if not isinstance(obj, dict) or obj.get("name") not in names:
            return text, None
        calls.append(_call(obj["name"], obj.get("arguments", {})))
    rest = _BLOCK.sub("", text).strip()
    return (rest or None), (calls or None)


def may_become_call(text: str) -> bool:
    """(auto, streaming) Whether an answer that begins with ``text`` may still be a tool call: it is held back
    until that is decided."""
    head = text.lstrip()
    return head.startswith(OPEN) or OPEN.startswith(head)


__all__ = ["call_id", "forced_name", "may_become_call", "parse_answer", "tool_spec"]
