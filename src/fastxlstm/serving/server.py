"""What every endpoint shares: :class:`ServerState` (tokenizer, chat template, scheduler or its proxy, metrics,
config) and the checks that turn a request body into generation requests (model name, prompt, token ids,
context length, sampling parameters, ``n``)."""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor

from ..sampling import SamplingParams
from ..tokenizer import Tokenizer
from .chat_template import ChatTemplate, ChatTemplateError
from .errors import APIError
from .grammar import Grammars
from .metrics import Metrics
from .replicas import Replicas
from .runtime import ServeConfig, check_speculative_config, make_scheduler
from .scheduler import Scheduler
from .schemas import ChatCompletionRequest, ChatMessage, TokenizeRequest
from .slots import SlotBackend
from .structured import GrammarSpec, StructuredError, request_spec
from .worker import RemoteBackend, WorkerSpec


def now() -> int:
    return int(time.time())


def message_dict(m: ChatMessage) -> dict:
    """A message as chat templates read it (transformers' convention: tool-call arguments as objects)."""
    out: dict = {"role": m.role, "content": m.text()}
    if m.name:
        out["name"] = m.name
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.tool_calls:
        calls = []
        for c in m.tool_calls:
            try:
                args = json.loads(c.function.arguments)
            except json.JSONDecodeError:
                args = c.function.arguments
            calls.append({"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": args}})
        out["tool_calls"] = calls
    return out


class ServerState:
    """Everything a route needs: tokenizer, template, scheduler, metrics, config. ``backend`` a
    :class:`~fastxlstm.serving.worker.WorkerSpec`: the scheduler runs in ``config.data_parallel_size`` worker
    processes (:class:`~fastxlstm.serving.replicas.Replicas` here)."""

    def __init__(self, backend: SlotBackend | WorkerSpec, tokenizer: Tokenizer, config: ServeConfig,
                 chat_template: ChatTemplate | None = None):
        self.tokenizer, self.config = tokenizer, config
        self.chat_template = chat_template or ChatTemplate()
        self.metrics = Metrics()
        self.remote = isinstance(backend, WorkerSpec)
        self.scheduler: Scheduler | Replicas
        if isinstance(backend, WorkerSpec):
            check_speculative_config(config.speculative_config, tokenizer, remote=True)  # (each worker loads it)
            self.backend = RemoteBackend(config.max_slots)
            self.scheduler = Replicas(backend, config, tokenizer.eos_token_id, self.backend)
        else:
            self.backend = backend
            self.scheduler = make_scheduler(backend, tokenizer.eos_token_id, config, self.metrics, tokenizer=tokenizer)
        self.created = now()
        self.names = {config.model_name, *config.aliases, *config.extra_model_names}
        self._pieces: dict[int, str] = {}
        self.max_prompt_bytes = config.max_prompt_bytes or config.max_model_len * tokenizer.max_text_bytes_per_token()
        self.pool = ThreadPoolExecutor(config.tokenizer_threads, thread_name_prefix="fastxlstm-text")
        self._grammars = None  # the grammar engine (.grammar.Grammars), built on the first structured request
        self._grammars_lock = asyncio.Lock()

    async def off_loop(self, fn, *args):
        """``fn(*args)`` in the text threads (chat templates, tokenising), so the event loop keeps serving."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def grammar(self, body, spec: GrammarSpec | None = None):
        """The compiled grammar of a request's structured-output fields (``spec``: one already built, e.g.
        from its tools), or None; compiled off the event loop with a deadline; every problem is a 400. With the
        scheduler in worker processes: a :class:`~fastxlstm.serving.grammar.SerializedGrammar` (plain text)."""
        try:
            own = request_spec(body)
        except StructuredError as e:
            raise APIError(400, str(e), param=e.param) from None
        if spec is not None and own is not None:
            raise APIError(400, "tool_choice required or named cannot be combined with another structured-output "
                                "constraint", param="tool_choice")
        spec = spec or own
        if spec is None:
            return None
        if body.ignore_eos:
            raise APIError(400, "ignore_eos cannot be combined with structured output (the grammar ends with EOS)",
                           param="ignore_eos")
        try:
            async with self._grammars_lock:
                if self._grammars is None:
                    self._grammars = await self.off_loop(Grammars, self.tokenizer, self.backend.vocab_size)
            return await self._grammars.compile_async(spec, serialized=self.remote)  # plain text for a worker
        except StructuredError as e:
            raise APIError(400, str(e), param=e.param) from None
        except RuntimeError as e:  # xgrammar is not installed
            raise APIError(400, str(e), param="response_format") from None

    def piece(self, token_id: int) -> str:
        """The text of one token on its own (special tokens included), memoised per token id."""
        text = self._pieces.get(token_id)
        if text is None:
            text = self._pieces[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    # ------------------------------------------------------------------ request -> generation requests
    def check_model(self, name: str) -> None:
        if name not in self.names:
            raise APIError(404, f"The model {name!r} does not exist; this server serves {self.config.model_name!r}",
                           param="model", code="model_not_found")

    def check_text(self, text: str, param: str) -> None:
        """Refuse, before tokenising, a text too long to fit ``max_model_len`` tokens whatever its tokens."""
        limit, n = self.max_prompt_bytes, len(text)
        if n > limit or (4 * n > limit and len(text.encode("utf-8", "surrogatepass")) > limit):
            raise APIError(400, f"This model's maximum context length is {self.config.max_model_len} tokens; the "
                                f"{param} has more than {limit} bytes of text, more than that many tokens hold",
                           param=param, code="context_length_exceeded")

    def encode(self, text: str, param: str = "prompt", add_bos: bool | None = None) -> list[int]:
        """Token ids of a prompt text (length-checked first; call it through :meth:`off_loop`)."""
        self.check_text(text, param)
        try:
            ids = self.tokenizer.encode(text, add_bos=add_bos, release_gil=True)
        except Exception as e:  # e.g. lone surrogates that are no valid Unicode text
            raise APIError(400, f"the prompt cannot be tokenized: {type(e).__name__}", param="prompt") from None
        if not ids:
            bos = self.tokenizer.bos_token_id
            if bos is None:
                raise APIError(400, "the prompt is empty", param="prompt")
            ids = [bos]
        return ids

    def check_ids(self, ids: list[int], param: str) -> None:
        vocab = self.backend.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is out of range [0, {vocab})", param=param)

    def params(self, body, prompt_len: int, max_tokens: int | None, default_max: int,
               logprobs: int | None) -> SamplingParams:
        limit = self.config.max_model_len
        if prompt_len >= limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens; the prompt has "
                                f"{prompt_len} tokens", param="messages" if hasattr(body, "messages") else "prompt",
                           code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(default_max, limit - prompt_len)
        if prompt_len + max_tokens > limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens; you requested "
                                f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for "
                                "the completion)", param="max_tokens", code="context_length_exceeded")
        bias = {}
        if body.logit_bias:
            bias = {int(k): float(v) for k, v in body.logit_bias.items()}
            self.check_ids(list(bias), "logit_bias")
        stop_ids = tuple(body.stop_token_ids or ())
        self.check_ids(list(stop_ids), "stop_token_ids")
        try:
            return SamplingParams(
                max_new_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k, min_p=body.min_p,
                repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty, logit_bias=bias, seed=body.seed,
                ignore_eos=body.ignore_eos, stop_token_ids=list(stop_ids), logprobs=logprobs,
            )
        except ValueError as e:  # the shared checks (e.g. at most 7 stop_token_ids)
            raise APIError(400, str(e)) from None

    def check_n(self, n: int, prompts: int) -> None:
        if n > self.backend.max_slots:
            raise APIError(400, f"n={n} exceeds the server's {self.backend.max_slots} sequence slots", param="n")
        if n * prompts > self.config.max_waiting:
            raise APIError(400, f"{n * prompts} choices in one request exceed the queue size "
                                f"{self.config.max_waiting}", param="n")

    def chat_prompt(self, body: ChatCompletionRequest | TokenizeRequest) -> tuple[list[int], tuple[int, ...]]:
        """Prompt token ids and the chat-turn boundaries worth caching (system prompt end, previous turn end).
        Bounded before any rendering (message count, text length); call it through :meth:`off_loop`."""
        if len(body.messages) > self.config.max_messages:
            raise APIError(400, f"at most {self.config.max_messages} messages per request", param="messages")
        messages = [message_dict(m) for m in body.messages]
        tools = [t.model_dump(exclude_none=True) for t in body.tools] if getattr(body, "tools_on", body.tools) else None
        extra = body.chat_template_kwargs or {}
        self.check_text("".join(m["content"] for m in messages) + (json.dumps(tools) if tools else "")
                        + json.dumps(extra, default=str), "messages")
        try:
            text = self.chat_template.render(messages, body.add_generation_prompt, body.continue_final_message,
                                             tools=tools, **extra)
        except ChatTemplateError as e:
            raise APIError(400, str(e), param="messages") from None
        ids = self.encode(text, "messages")
        points: list[int] = []
        if self.config.cache_chat_turns and self.config.prefix_cache_bytes > 0:
            n_sys = next((i for i, m in enumerate(messages) if m["role"] not in ("system", "developer")),
                         len(messages))
            for k in sorted({n_sys, len(messages) - 1}):
                if not 0 < k < len(messages):
                    continue
                try:
                    prefix = self.chat_template.render(messages[:k], add_generation_prompt=False, tools=tools, **extra)
                except ChatTemplateError:
                    continue
                if not prefix or not text.startswith(prefix):
                    continue
                prefix_ids = self.tokenizer.encode(prefix, release_gil=True)
                if 0 < len(prefix_ids) < len(ids) and ids[: len(prefix_ids)] == prefix_ids:
                    points.append(len(prefix_ids))
        return ids, tuple(points)

