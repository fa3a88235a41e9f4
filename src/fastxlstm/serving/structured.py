"""Structured output and tools as requests give them: OpenAI's ``response_format`` and ``tools``, vLLM's
``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar`` and their newer ``structured_outputs``
names, checked against the documented bounds and turned into one :class:`GrammarSpec` (what
:mod:`.grammar` compiles). Plain data, no grammar engine here: the request schemas import these models."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, field_validator

MAX_GRAMMAR_BYTES = 64 * 1024  # a schema / regex / grammar / the choices, as JSON or text
MAX_SCHEMA_DEPTH = 32  # nesting of objects and arrays in a JSON schema document
MAX_CHOICES = 256  # guided_choice entries
MAX_TOOLS = 128  # tools per chat request (OpenAI's limit)
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # a function name (OpenAI: a-z, A-Z, 0-9, _ and -, at most 64)


class StructuredError(ValueError):
    """The request's structured-output fields are malformed or over a bound (a 400 naming ``param``)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: StrictStr = Field("response", max_length=64)
    description: StrictStr | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: StrictBool | None = None  # the grammar always enforces the schema


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's ``structured_outputs`` (the newer names of ``guided_*``)."""

    model_config = ConfigDict(extra="forbid")
    json_: dict[str, Any] | StrictStr | None = Field(None, alias="json")
    regex: StrictStr | None = None
    choice: list[StrictStr] | None = None
    grammar: StrictStr | None = None
    json_object: StrictBool | None = None
    disable_any_whitespace: StrictBool | None = None  # always: no free whitespace (docs/serving.md)
    disable_fallback: StrictBool | None = None
    disable_additional_properties: StrictBool | None = None


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StrictStr
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.fullmatch(value):
            raise ValueError("function names are 1 to 64 characters of a-z, A-Z, 0-9, '_', '.' and '-'")
        return value


class _OfFunction(BaseModel):
    """A ``{"type": "function", "function": ...}`` wrapper (subclasses give ``function`` its type)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]


class Tool(_OfFunction):
    function: FunctionDef


class FunctionName(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StrictStr


class NamedToolChoice(_OfFunction):
    function: FunctionName


class FunctionCall(FunctionName):
    arguments: StrictStr


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: StrictStr
    type: Literal["function"] = "function"
    function: FunctionCall


@dataclass(frozen=True)
class GrammarSpec:
    """One constraint: ``kind`` ``json`` (``source``: a JSON schema's text), ``json_object`` (any JSON object),
    ``regex``, ``choice`` (``source``: a JSON list of strings) or ``grammar`` (EBNF, xgrammar's GBNF dialect).
    Picklable: the scheduler process compiles its own."""

    kind: Literal["json", "json_object", "regex", "choice", "grammar"]
    source: str = ""


def schema_depth(value: Any) -> int:
    """Nesting depth of a JSON value (containers), without recursion."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        v, d = todo.pop()
        if isinstance(v, dict | list):
            deepest = max(deepest, d)
            if d > MAX_SCHEMA_DEPTH:
                return d
            todo.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def json_spec(schema: dict[str, Any] | str, param: str) -> GrammarSpec:
    """A JSON-schema constraint, bounded (size, depth) and checked to be a JSON object."""
    if isinstance(schema, str):
        if len(schema) > MAX_GRAMMAR_BYTES:
            raise StructuredError(f"{param}: the schema is over {MAX_GRAMMAR_BYTES} bytes", param)
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise StructuredError(f"{param}: the schema is not valid JSON: {e}", param) from None
    if not isinstance(schema, dict):
        raise StructuredError(f"{param}: the schema must be a JSON object", param)
    if schema_depth(schema) > MAX_SCHEMA_DEPTH:
        raise StructuredError(f"{param}: the schema nests deeper than {MAX_SCHEMA_DEPTH} levels", param)
    text = json.dumps(schema, separators=(",", ":"))
    if len(text.encode()) > MAX_GRAMMAR_BYTES:
        raise StructuredError(f"{param}: the schema is over {MAX_GRAMMAR_BYTES} bytes", param)
    return GrammarSpec("json", text)


def _text_spec(kind: str, source: str, param: str) -> GrammarSpec:
    if not source:
        raise StructuredError(f"{param} must not be empty", param)
    if len(source.encode("utf-8", "surrogatepass")) > MAX_GRAMMAR_BYTES:
        raise StructuredError(f"{param} is over {MAX_GRAMMAR_BYTES} bytes", param)
    return GrammarSpec(kind, source)  # type: ignore[arg-type]


def _choice_spec(choices: list[str], param: str) -> GrammarSpec:
    if not choices or len(choices) > MAX_CHOICES or not all(choices):
        raise StructuredError(f"{param}: 1 to {MAX_CHOICES} non-empty strings", param)
    return _text_spec("choice", json.dumps(choices), param)


def request_spec(body) -> GrammarSpec | None:
    """The one constraint a completions or chat request asks for (None: free text); two is a 400."""
    found: list[tuple[str, GrammarSpec]] = []
    rf = body.response_format
    if rf is not None and rf.type == "json_object":
        found.append(("response_format", GrammarSpec("json_object")))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise StructuredError("response_format json_schema needs json_schema.schema", "response_format")
        found.append(("response_format", json_spec(rf.json_schema.schema_, "response_format")))
    if body.guided_json is not None:
        found.append(("guided_json", json_spec(body.guided_json, "guided_json")))
    if body.guided_regex is not None:
        found.append(("guided_regex", _text_spec("regex", body.guided_regex, "guided_regex")))
    if body.guided_choice is not None:
        found.append(("guided_choice", _choice_spec(body.guided_choice, "guided_choice")))
    if body.guided_grammar is not None:
        found.append(("guided_grammar", _text_spec("grammar", body.guided_grammar, "guided_grammar")))
    so = body.structured_outputs
    if so is not None:
        p = "structured_outputs"
        if so.json_ is not None:
            found.append((p, json_spec(so.json_, p + ".json")))
        if so.regex is not None:
            found.append((p, _text_spec("regex", so.regex, p + ".regex")))
        if so.choice is not None:
            found.append((p, _choice_spec(so.choice, p + ".choice")))
        if so.grammar is not None:
            found.append((p, _text_spec("grammar", so.grammar, p + ".grammar")))
        if so.json_object:
            found.append((p, GrammarSpec("json_object")))
    if len(found) > 1:
        names = ", ".join(sorted({name for name, _ in found}))
        raise StructuredError(f"give one structured-output constraint, got several ({names})", found[1][0])
    return found[0][1] if found else None


__all__ = ["FunctionDef", "GrammarSpec", "JSONSchemaFormat", "MAX_CHOICES", "MAX_GRAMMAR_BYTES",
           "MAX_SCHEMA_DEPTH", "MAX_TOOLS", "NamedToolChoice", "ResponseFormat", "StructuredError",
           "StructuredOutputs", "Tool", "ToolCall", "json_spec", "request_spec", "schema_depth"]
