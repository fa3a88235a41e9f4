"""Pydantic request/response schemas of the OpenAI-compatible API (completions, chat, models, tokenize).

Requests forbid unknown fields (a typo is a 400, not a silently ignored knob); OpenAI features this server does
not have are a 400 naming them (:data:`UNSUPPORTED`), and OpenAI's bookkeeping fields (``store``, ``metadata``,
``user``, ``service_tier``, ...) are accepted and ignored (docs/serving.md lists which). Besides the OpenAI
parameters, the vLLM extras ``top_k``, ``min_p``, ``repetition_penalty``, ``ignore_eos``, ``stop_token_ids``,
``include_stop_str_in_output``, ``prompt_logprobs`` and the structured-output fields (``guided_*``,
``structured_outputs``: :mod:`.structured`) are accepted.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator, model_validator

from .structured import MAX_TOOLS, NamedToolChoice, ResponseFormat, StructuredOutputs, Tool, ToolCall

_TOKEN_ID = re.compile(r"-?[0-9]{1,10}")  # a logit_bias key: ASCII digits (int() also takes other scripts' digits)
Temperature = Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]


# OpenAI features this server does not have: a 400 that names them (not "unrecognized request argument")
UNSUPPORTED = {
    "audio": "audio output is not supported", "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported", "web_search_options": "web search is not supported",
    "functions": "the deprecated `functions` are not supported; use `tools`",
    "function_call": "the deprecated `function_call` is not supported; use `tool_choice`",
    "min_tokens": "min_tokens is not supported", "logits_processors": "logits_processors are not supported",
    "chat_template": "a per-request chat_template is not supported (start the server with --chat-template)",
    "guided_whitespace_pattern": "guided_whitespace_pattern is not supported",
}
MAX_METADATA = 16  # OpenAI's limit of metadata pairs


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False  # vLLM: accepted, ignored (usage comes with the last chunk)
    include_obfuscation: StrictBool | None = None  # OpenAI: accepted, ignored (no obfuscation padding)


class _SamplingFields(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    model: StrictStr
    max_tokens: StrictInt | None = Field(None, ge=0)
    temperature: Temperature | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] | None = None
    n: StrictInt = Field(1, ge=1, le=128)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = Field(None, ge=-(2**63), le=2**64 - 1)
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    # keys: token ids as strings (JSON); the validator turns them into ints
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0, allow_inf_nan=False)]] | None = None
    # accepted and ignored: OpenAI bookkeeping that does not change the answer
    user: StrictStr | None = None
    store: StrictBool | None = None
    metadata: dict[StrictStr, StrictStr] | None = None
    service_tier: StrictStr | None = None
    prompt_cache_key: StrictStr | None = None
    safety_identifier: StrictStr | None = None
    priority: StrictInt | None = None  # vLLM's scheduling priority (this scheduler is first come first served)
    guided_decoding_backend: StrictStr | None = None  # vLLM: the grammar engine is always xgrammar here
    skip_special_tokens: StrictBool = True  # vLLM: special tokens are always left out of the text
    spaces_between_special_tokens: StrictBool = True
    # structured output (see .structured): OpenAI's response_format and vLLM's guided_* / structured_outputs
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | StrictStr | None = None
    guided_regex: StrictStr | None = None
    guided_choice: list[StrictStr] | None = None
    guided_grammar: StrictStr | None = None
    structured_outputs: StructuredOutputs | None = None
    # vLLM: log-probabilities of the prompt tokens (with this many alternatives)
    prompt_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    # vLLM-style extras
    top_k: StrictInt = Field(0, ge=-1)
    min_p: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] = 0.0
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0, allow_inf_nan=False)] = 1.0
    ignore_eos: StrictBool = False
    stop_token_ids: list[StrictInt] | None = None
    include_stop_str_in_output: StrictBool = False

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data):
        if isinstance(data, dict):
            for key, why in UNSUPPORTED.items():
                if key in data and not (key == "modalities" and data[key] in (["text"], None)):
                    raise ValueError(f"{key}: {why}")
        return data

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None and (len(value) > MAX_METADATA or any(len(k) > 64 or len(v) > 512
                                                                    for k, v in value.items())):
            raise ValueError(f"metadata: at most {MAX_METADATA} pairs, keys up to 64 and values up to 512 characters")
        return value

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if len(stops) > 16:
            raise ValueError("at most 16 stop sequences are allowed")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must be non-empty")
        if any(len(s) > 1024 for s in stops):
            raise ValueError("stop sequences must be at most 1024 characters")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value: dict[str, float] | None) -> dict[int, float] | None:
        """The keys parsed here, once: what passes is what the sampler gets (ASCII decimal ids only; ``int()``
        alone would take ``" 5"``, ``"5_0"`` or ``"٥"`` and ``str.isdigit`` takes ``"²"``, which ``int()`` refuses)."""
        if value is None:
            return None
        if len(value) > 1024:
            raise ValueError("logit_bias may name at most 1024 tokens")
        out: dict[int, float] = {}
        for key, bias in value.items():
            if not _TOKEN_ID.fullmatch(key):
                raise ValueError(f"logit_bias keys must be token ids (decimal integers), got {key[:32]!r}")
            if int(key) in out:
                raise ValueError(f"logit_bias names token {int(key)} twice")
            out[int(key)] = bias
        return out

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, value: int) -> int:
        return 0 if value == -1 else value  # vLLM: -1 disables

    @model_validator(mode="after")
    def _stream_opts(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self


TokenIds = list[Annotated[int, Field(strict=True)]]


def _check_max_tokens(body) -> None:
    if body.max_tokens == 0 and not (getattr(body, "echo", False) or body.prompt_logprobs is not None):
        raise ValueError("max_tokens 0 (scoring the prompt only) needs echo or prompt_logprobs")


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions``."""

    prompt: StrictStr | list[StrictStr] | TokenIds | list[TokenIds]
    logprobs: StrictInt | None = Field(None, ge=0, le=20)
    echo: StrictBool = False
    suffix: StrictStr | None = None
    best_of: StrictInt | None = None

    @model_validator(mode="after")
    def _completion_checks(self):
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported (only best_of == n)")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be empty")
        _check_max_tokens(self)
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list of strings or token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "refusal"]
    text: StrictStr | None = None
    refusal: StrictStr | None = None

    @model_validator(mode="before")
    @classmethod
    def _kind(cls, data):
        if isinstance(data, dict) and data.get("type") not in ("text", "refusal", None):
            raise ValueError(f"content parts of type {str(data.get('type'))[:32]!r} are not supported (text only)")
        return data

    @property
    def value(self) -> str:
        return (self.text if self.type == "text" else self.refusal) or ""


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: StrictStr | None = None  # a tool turn: which call it answers
    refusal: StrictStr | None = None  # an assistant turn's refusal (OpenAI echoes it back): ignored

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.value for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None  # honoured as: at most one call per answer (docs/serving.md)
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    chat_template_kwargs: dict[StrictStr, Any] | None = None  # extra variables for the chat template
    reasoning_effort: StrictStr | None = None  # accepted, ignored (no reasoning mode)
    verbosity: StrictStr | None = None  # accepted, ignored

    @model_validator(mode="after")
    def _chat_checks(self):
        if self.tool_choice is not None and self.tool_choice != "none" and not self.tools:
            raise ValueError("tool_choice needs tools")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in {
                t.function.name for t in self.tools or ()}:
            raise ValueError(f"tool_choice names the function {self.tool_choice.function.name!r}, which is not "
                             "among the tools")
        names = [t.function.name for t in self.tools or ()]
        if len(set(names)) != len(names):
            raise ValueError("tools: function names must be unique")
        if self.chat_template_kwargs is not None:
            reserved = {"messages", "tools", "add_generation_prompt", "continue_final_message"}
            if len(self.chat_template_kwargs) > 32 or reserved & set(self.chat_template_kwargs):
                raise ValueError("chat_template_kwargs: at most 32 variables, none of "
                                 f"{', '.join(sorted(reserved))}")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("give max_tokens or max_completion_tokens, not both")
        if self.continue_final_message and (self.add_generation_prompt or self.messages[-1].role != "assistant"):
            raise ValueError("continue_final_message needs add_generation_prompt=false and a final assistant message")
        if self.max_new_tokens == 0:
            raise ValueError("max_tokens must be at least 1 for chat")
        return self

    @property
    def tools_on(self) -> bool:
        """Tools are offered to the model (given, and tool_choice is not none)."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ---------------------------------------------------------------------------------------------- responses
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int] | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class PromptLogprob(BaseModel):
    """vLLM's entry of ``prompt_logprobs`` (per position: token id -> this)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    prompt_logprobs: list[dict[int, PromptLogprob] | None] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: list[dict[int, PromptLogprob] | None] | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "fastxlstm"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ------------------------------------------------------------------------------------- tokenize (vLLM)
class TokenizeRequest(BaseModel):
    """``POST /tokenize``: a ``prompt``, or chat ``messages`` rendered through the chat template."""

    model_config = ConfigDict(extra="forbid")
    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    return_token_strs: StrictBool = False
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    chat_template_kwargs: dict[StrictStr, Any] | None = None

    @model_validator(mode="after")
    def _one(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give prompt or messages")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: StrictStr | None = None
    tokens: TokenIds
