"""``POST /v1/completions``: text or token-id prompts (several per call, ``n`` choices each), echo, legacy
logprobs (tokens, token_logprobs, top_logprobs, text_offset) of the completion and, with ``echo``, of the prompt
(scored on the device as it is prefilled; the first token's is null, as OpenAI has it), vLLM's
``prompt_logprobs``, ``max_tokens: 0`` (scoring only), structured output; streamed as SSE or answered whole."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

from fastapi import Request

from .call import Call, collect
from .errors import APIError
from .middleware import parse_body
from .requests import GenerationRequest
from .schemas import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, PromptLogprob
from .server import ServerState, now
from .sse import SSEChunks, event_stream, sse_event


def prompt_entries(prompt: list[int], scores) -> list[tuple[int, float | None, list | None]]:
    """The prompt's tokens as logprob entries ``(token, logprob, top)``: the first token has none."""
    out: list[tuple[int, float | None, list | None]] = [(prompt[0], None, None)]
    tops = scores.top or [None] * len(scores.logprobs)
    out.extend((t, lp, top) for t, lp, top in zip(prompt[1:], scores.logprobs, tops))
    return out


def vllm_prompt_logprobs(server: ServerState, prompt: list[int], scores, k: int) -> list:
    """vLLM's ``prompt_logprobs``: per prompt token (the first: null) ``{token_id: {logprob, rank,
    decoded_token}}``, the token itself and its ``k`` likeliest alternatives."""
    out: list = [None]
    tops = scores.top or [[]] * len(scores.logprobs)
    for t, lp, rank, top in zip(prompt[1:], scores.logprobs, scores.ranks, tops):
        entry = {t: PromptLogprob(logprob=lp, rank=rank, decoded_token=server.piece(t))}
        for r, (alt, v) in enumerate(top[:k], start=1):
            entry.setdefault(alt, PromptLogprob(logprob=v, rank=r, decoded_token=server.piece(alt)))
        out.append(entry)
    return out


async def completions(server: ServerState, request: Request):
    """One completions call (the caller has checked the API key)."""
    config, tokenizer = server.config, server.tokenizer
    body: CompletionRequest = await parse_body(request, CompletionRequest, server.off_loop)  # type: ignore[assignment]
    server.check_model(body.model)
    prompts = body.prompts()
    if len(prompts) > config.max_prompts:
        raise APIError(400, f"at most {config.max_prompts} prompts per request", param="prompt")
    server.check_n(body.n, len(prompts))
    echo_lp = body.echo and body.logprobs is not None  # the prompt's logprobs come with the echoed text
    scored = max(body.logprobs or 0, body.prompt_logprobs or 0) if echo_lp or body.prompt_logprobs is not None \
        else None
    grammar = await server.grammar(body)
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
        reqs.append(GenerationRequest(ids, params, body.n, timeout=config.request_timeout, prompt_logprobs=scored,
                                      grammar=grammar))
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
            for t, v in (top or [])[: body.logprobs]:  # byte fragments can decode alike: keep the likelier one
                alts.setdefault(server.piece(t), v)
            out["top_logprobs"].append(alts or None)
            out["text_offset"].append(pos)
            pos += len(piece)
        return out

    def prompt_lp(i: int) -> dict | None:
        """The echoed prompt's logprobs of choice ``i``."""
        if not echo_lp:
            return None
        r = i // body.n
        return lp_dict(prompt_entries(reqs[r].prompt, call.prompt_scores[r]), 0)

    def vllm_lp(i: int) -> list | None:
        if body.prompt_logprobs is None:
            return None
        r = i // body.n
        return vllm_prompt_logprobs(server, reqs[r].prompt, call.prompt_scores[r], body.prompt_logprobs)

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        head = {"id": cid, "object": "text_completion", "created": created, "model": body.model}

        def echo_chunks() -> str:
            """Each choice's first chunk: the echoed prompt (with its logprobs), vLLM's prompt_logprobs."""
            out = []
            for i, e in enumerate(echo):
                choice = {"index": i, "text": e, "logprobs": prompt_lp(i), "finish_reason": None}
                if body.prompt_logprobs is not None:
                    choice["prompt_logprobs"] = [x if x is None else {k: v.model_dump() for k, v in x.items()}
                                                 for x in vllm_lp(i)]
                out.append(sse_event({**head, "choices": [choice]}))
            return "".join(out)

        async def stream() -> AsyncIterator[str]:
            offsets = [len(e) for e in echo]
            sse, field = SSEChunks(head), SSEChunks.field
            want_lp = body.logprobs is not None
            done = 0
            echoed = not (body.echo or body.prompt_logprobs is not None)
            if not echoed and scored is None:  # nothing to wait for
                yield echo_chunks()
                echoed = True
            async for batch in call.batches():
                out = [] if echoed else [echo_chunks()]  # the prompt's scores arrive before any update
                echoed = True
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

    answers, lps = await collect(request, call)
    texts_out = [head + answer for head, answer in zip(echo, answers)]
    choices = []
    for i, st in enumerate(call.choices):
        logprobs = None
        if body.logprobs is not None:
            logprobs = lp_dict(lps[i], len(echo[i]))
            head_lp = prompt_lp(i)
            if head_lp is not None:
                logprobs = {k: head_lp[k] + logprobs[k] for k in logprobs}
        choices.append(CompletionChoice(index=i, text=texts_out[i], finish_reason=st.finish_reason,
                                        logprobs=CompletionLogprobs(**logprobs) if logprobs is not None else None,
                                        prompt_logprobs=vllm_lp(i)))
    return CompletionResponse(id=cid, created=created, model=body.model, choices=choices, usage=call.usage())
