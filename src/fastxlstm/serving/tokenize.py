"""vLLM's tokenizer endpoints: ``POST /tokenize`` (a prompt, or chat messages through the chat template),
``POST /detokenize``, ``GET /tokenizer_info`` (what lm-eval's remote tokenizer reads), and ``GET /version``."""

from __future__ import annotations

from importlib import metadata

from fastapi import Request

from .errors import APIError
from .middleware import parse_body
from .schemas import DetokenizeRequest, TokenizeRequest
from .server import ServerState


def _check_model(server: ServerState, name: str | None) -> None:
    if name is not None:
        server.check_model(name)


async def tokenize(server: ServerState, request: Request) -> dict:
    body: TokenizeRequest = await parse_body(request, TokenizeRequest, server.off_loop)  # type: ignore[assignment]
    _check_model(server, body.model)
    if body.messages is not None:
        ids, _ = await server.off_loop(server.chat_prompt, body)
    else:
        ids = await server.off_loop(server.encode, body.prompt, "prompt",
                                    None if body.add_special_tokens else False)
    out = {"count": len(ids), "max_model_len": server.config.max_model_len, "tokens": ids, "token_strs": None}
    if body.return_token_strs:
        out["token_strs"] = [server.piece(t) for t in ids]
    return out


async def detokenize(server: ServerState, request: Request) -> dict:
    body: DetokenizeRequest = await parse_body(request, DetokenizeRequest, server.off_loop)  # type: ignore[assignment]
    _check_model(server, body.model)
    limit = server.config.max_model_len
    if len(body.tokens) > limit:
        raise APIError(400, f"at most {limit} tokens (--max-model-len) per detokenize call", param="tokens")
    server.check_ids(body.tokens, "tokens")
    return {"prompt": await server.off_loop(server.tokenizer.decode, body.tokens)}


def tokenizer_info(server: ServerState) -> dict:
    tok = server.tokenizer
    specials = {f"{name}_token": None if i is None else server.piece(i)
                for name, i in (("bos", tok.bos_token_id), ("eos", tok.eos_token_id), ("pad", tok.pad_token_id))}
    return {"tokenizer_class": "PreTrainedTokenizerFast", **specials, "add_bos_token": tok.add_bos,
            "model_max_length": server.config.max_model_len, "chat_template": server.chat_template.source,
            "vocab_size": tok.vocab_size}


def version() -> dict:
    """The installed package's version (the package root is the public facade: nothing inside imports it)."""
    try:
        return {"version": metadata.version("fastxlstm")}
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return {"version": "unknown"}
