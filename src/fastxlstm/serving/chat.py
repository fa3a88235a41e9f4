"""``POST /v1/chat/completions``: messages rendered through the chat template (with the chat-turn prefix-cache
points), ``n`` choices, chat logprobs, structured output and tool calls (:mod:`.tools`), streamed as SSE (role
chunk, content or tool-call deltas, finish chunk) or answered whole."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

from fastapi import Request

from .call import Call, collect
from .completions import vllm_prompt_logprobs
from .middleware import parse_body
from .requests import GenerationRequest
from .schemas import AssistantMessage, ChatChoice, ChatCompletionRequest, ChatCompletionResponse, ChatLogprobs
from .server import ServerState, now
from .sse import SSEChunks, event_stream
from .tools import call_id, forced_name, may_become_call, parse_answer, tool_spec


async def chat_completions(server: ServerState, request: Request):
    """One chat-completions call (the caller has checked the API key)."""
    config = server.config
    body: ChatCompletionRequest = await parse_body(request, ChatCompletionRequest, server.off_loop)  # type: ignore[assignment]
    server.check_model(body.model)
    server.check_n(body.n, 1)
    tools = body.tools_on
    grammar = await server.grammar(body, tool_spec(body) if tools else None)
    ids, points = await server.off_loop(server.chat_prompt, body)
    top = body.top_logprobs or 0
    params = server.params(body, len(ids), body.max_new_tokens, config.default_max_tokens,
                           top if body.logprobs else None)
    req = GenerationRequest(ids, params, body.n, cache_points=points, cache_generation_end=config.cache_chat_turns,
                            timeout=config.request_timeout, prompt_logprobs=body.prompt_logprobs, grammar=grammar)
    stops = server.chat_template.stops(body.stop or ())
    call = Call(server, [req], body.n, stops or None, body.include_stop_str_in_output)
    call.submit()
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", now()
    named = forced_name(body) if tools else None

    def lp_dict(entries) -> dict:
        content = []
        for tok_id, lp, alts in entries:
            piece = server.piece(tok_id)
            tops = []
            for t, v in alts or []:
                alt = server.piece(t)
                tops.append({"token": alt, "logprob": v, "bytes": list(alt.encode("utf-8", "replace"))})
            content.append({"token": piece, "logprob": lp, "bytes": list(piece.encode("utf-8", "replace")),
                            "top_logprobs": tops})
        return {"content": content}

    def finish(reason: str | None, calls) -> str | None:
        return "tool_calls" if calls and reason == "stop" else reason

    def prompt_lp() -> list | None:
        if body.prompt_logprobs is None:
            return None
        return vllm_prompt_logprobs(server, req.prompt, call.prompt_scores[0], body.prompt_logprobs)

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": body.model}

        sse, field = SSEChunks(head), SSEChunks.field

        def chunk(index: int, delta: dict, logprobs=None, finish_reason=None, usage=None) -> str:
            return sse.chunk(index, field("delta", delta) + field("logprobs", logprobs)
                             + field("finish_reason", finish_reason), usage)

        async def stream() -> AsyncIterator[str]:
            done = 0
            held = [""] * body.n  # (tools on) text not sent yet: it may be a tool call
            sent = [False] * body.n  # (tools on) content or the named call's head went out
            yield "".join(chunk(i, {"role": "assistant", "content": ""}) for i in range(body.n))
            async for batch in call.batches():
                out = []
                for u in batch:
                    done += u.finish_reason is not None
                    last = done == len(call.choices) and not include_usage
                    lp = lp_dict(u.logprobs) if body.logprobs else None
                    calls = None
                    if named is not None:  # the answer is the forced call's arguments: stream them
                        if not sent[u.index]:
                            sent[u.index] = True
                            out.append(chunk(u.index, {"tool_calls": [{
                                "index": 0, "id": call_id(), "type": "function",
                                "function": {"name": named, "arguments": ""}}]}))
                        if u.delta or u.logprobs:
                            out.append(chunk(u.index, {"tool_calls": [{"index": 0, "function": {
                                "arguments": u.delta}}]}, lp))
                        calls = True
                    elif tools and not sent[u.index]:  # held back while it may still be a tool call
                        held[u.index] += u.delta
                        if u.finish_reason is not None:
                            content, calls = parse_answer(held[u.index], body)
                            delta = {"tool_calls": [{"index": j, **c} for j, c in enumerate(calls)]} if calls \
                                else {"content": content or ""}
                            out.append(chunk(u.index, delta, lp))
                        elif body.tool_choice != "required" and not may_become_call(held[u.index]):
                            sent[u.index] = True
                            out.append(chunk(u.index, {"content": held[u.index]}, lp))
                    elif u.delta or u.logprobs:
                        out.append(chunk(u.index, {"content": u.delta}, lp))
                    if u.finish_reason is not None:
                        out.append(chunk(u.index, {}, None, finish(u.finish_reason, calls),
                                         call.usage().model_dump() if last else None))
                yield "".join(out)

        return event_stream(call, head, include_usage, stream())

    texts, lps = await collect(request, call)
    choices = []
    for i, st in enumerate(call.choices):
        content, calls = parse_answer(texts[i], body) if tools else (texts[i], None)
        choices.append(ChatChoice(index=i, message=AssistantMessage(content=content, tool_calls=calls),
                                  finish_reason=finish(st.finish_reason, calls),
                                  logprobs=ChatLogprobs(**lp_dict(lps[i])) if body.logprobs else None))
    return ChatCompletionResponse(id=cid, created=created, model=body.model, choices=choices, usage=call.usage(),
                                  prompt_logprobs=prompt_lp())
