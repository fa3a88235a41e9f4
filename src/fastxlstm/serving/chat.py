"""``POST /v1/chat/completions``: messages rendered through the chat template (with the chat-turn prefix-cache
points), ``n`` choices, chat logprobs, streamed as SSE (role chunk, content deltas, finish chunk) or answered whole."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

from fastapi import Request

from .call import Call, collect
from .middleware import parse_body
from .requests import GenerationRequest
from .schemas import AssistantMessage, ChatChoice, ChatCompletionRequest, ChatCompletionResponse, ChatLogprobs
from .server import ServerState, now
from .sse import SSEChunks, event_stream


async def chat_completions(server: ServerState, request: Request):
    """One chat-completions call (the caller has checked the API key)."""
    config = server.config
    body: ChatCompletionRequest = await parse_body(request, ChatCompletionRequest, server.off_loop)  # type: ignore[assignment]
    server.check_model(body.model)
    server.check_n(body.n, 1)
    ids, points = await server.off_loop(server.chat_prompt, body)
    top = body.top_logprobs or 0
    params = server.params(body, len(ids), body.max_new_tokens, config.default_max_tokens,
                           top if body.logprobs else None)
    req = GenerationRequest(ids, params, body.n, cache_points=points,
                            cache_generation_end=config.cache_chat_turns, timeout=config.request_timeout)
    call = Call(server, [req], body.n, body.stop, body.include_stop_str_in_output)
    call.submit()
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", now()

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

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": body.model}

        sse, field = SSEChunks(head), SSEChunks.field

        def chunk(index: int, delta: dict, logprobs=None, finish_reason=None, usage=None) -> str:
            return sse.chunk(index, field("delta", delta) + field("logprobs", logprobs)
                             + field("finish_reason", finish_reason), usage)

        async def stream() -> AsyncIterator[str]:
            done = 0
            yield "".join(chunk(i, {"role": "assistant", "content": ""}) for i in range(body.n))
            async for batch in call.batches():
                out = []
                for u in batch:
                    done += u.finish_reason is not None
                    last = done == len(call.choices) and not include_usage
                    if u.delta or u.logprobs:
                        out.append(chunk(u.index, {"content": u.delta},
                                         lp_dict(u.logprobs) if body.logprobs else None))
                    if u.finish_reason is not None:
                        out.append(chunk(u.index, {}, None, u.finish_reason,
                                         call.usage().model_dump() if last else None))
                yield "".join(out)

        return event_stream(call, head, include_usage, stream())

    updates = await collect(request, call)
    texts = [""] * len(call.choices)
    lps: list[list] = [[] for _ in call.choices]
    for u in updates:
        texts[u.index] += u.delta
        lps[u.index].extend(u.logprobs)
    choices = [ChatChoice(index=i, message=AssistantMessage(content=texts[i]), finish_reason=st.finish_reason,
                          logprobs=ChatLogprobs(**lp_dict(lps[i])) if body.logprobs else None)
               for i, st in enumerate(call.choices)]
    return ChatCompletionResponse(id=cid, created=created, model=body.model, choices=choices, usage=call.usage())
