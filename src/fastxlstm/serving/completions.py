"""``POST /v1/completions``: text or token-id prompts (several per call, ``n`` choices each), echo, legacy
logprobs (tokens, token_logprobs, top_logprobs, text_offset), streamed as SSE or answered whole."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

from fastapi import Request

from .call import Call, collect
from .errors import APIError
from .middleware import parse_body
from .requests import GenerationRequest
from .schemas import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse
from .server import ServerState, now
from .sse import SSEChunks, event_stream, sse_event


async def completions(server: ServerState, request: Request):
    """One completions call (the caller has checked the API key)."""
    config, tokenizer = server.config, server.tokenizer
    body: CompletionRequest = await parse_body(request, CompletionRequest, server.off_loop)  # type: ignore[assignment]
    server.check_model(body.model)
    prompts = body.prompts()
    if len(prompts) > config.max_prompts:
        raise APIError(400, f"at most {config.max_prompts} prompts per request", param="prompt")
    server.check_n(body.n, len(prompts))
    reqs, texts = [], []
    for p in prompts:
        if isinstance(p, str):
            ids = await server.off_loop(server.encode, p)
        elif not p:
            raise APIError(400, "a token-id prompt must not be empty", param="prompt")
        else:
            ids = p
        params = server.params(body, len(ids), body.max_tokens, 16, body.logprobs)  # the length first
        if not isinstance(p, str):
            server.check_ids(p, "prompt")
        texts.append(p if isinstance(p, str) else tokenizer.decode(p) if body.echo else "")
        reqs.append(GenerationRequest(ids, params, body.n, timeout=config.request_timeout))
    call = Call(server, reqs, body.n, body.stop, body.include_stop_str_in_output)
    call.submit()
    cid, created = f"cmpl-{uuid.uuid4().hex}", now()
    echo = [texts[i // body.n] if body.echo else "" for i in range(len(call.choices))]

    def lp_dict(entries, offset0: int) -> dict:
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        pos = offset0
        for tok_id, lp, top in entries:
            piece = server.piece(tok_id)
            out["tokens"].append(piece)
            out["token_logprobs"].append(lp)
            alts: dict[str, float] = {}
            for t, v in top or []:  # byte fragments can decode alike: keep the likelier one
                alts.setdefault(server.piece(t), v)
            out["top_logprobs"].append(alts or None)
            out["text_offset"].append(pos)
            pos += len(piece)
        return out

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        head = {"id": cid, "object": "text_completion", "created": created, "model": body.model}

        async def stream() -> AsyncIterator[str]:
            offsets = [len(e) for e in echo]
            sse, field = SSEChunks(head), SSEChunks.field
            want_lp = body.logprobs is not None
            done = 0
            if body.echo:
                yield "".join(sse_event({**head, "choices": [{"index": i, "text": e, "logprobs": None,
                                                         "finish_reason": None}]})
                              for i, e in enumerate(echo))
            async for batch in call.batches():
                out = []
                for u in batch:
                    lp = lp_dict(u.logprobs, offsets[u.index]) if want_lp else None
                    offsets[u.index] += len(u.delta)
                    done += u.finish_reason is not None
                    last = done == len(call.choices) and not include_usage
                    out.append(sse.chunk(u.index, field("text", u.delta) + field("logprobs", lp)
                                         + field("finish_reason", u.finish_reason),
                                         call.usage().model_dump() if last else None))
                yield "".join(out)

        return event_stream(call, head, include_usage, stream())

    updates = await collect(request, call)
    texts_out = list(echo)
    lps: list[list] = [[] for _ in call.choices]
    for u in updates:
        texts_out[u.index] += u.delta
        lps[u.index].extend(u.logprobs)
    choices = [
        CompletionChoice(index=i, text=texts_out[i], finish_reason=st.finish_reason,
                         logprobs=CompletionLogprobs(**lp_dict(lps[i], len(echo[i])))
                         if body.logprobs is not None else None)
        for i, st in enumerate(call.choices)
    ]
    return CompletionResponse(id=cid, created=created, model=body.model, choices=choices, usage=call.usage())
