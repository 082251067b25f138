"""The OpenAI-compatible HTTP API of one served run (FastAPI).

    POST /v1/chat/completions   (stream: true -> server-sent events, OpenAI's chunk format, then `data: [DONE]`)
    POST /v1/completions
    POST /v1/rewards            reward-model runs: a user's rewards of one prompt's responses (best-of-n)
    GET  /v1/models   GET /v1/users   GET /v1/users/{user_id}   POST /v1/users (onboarding)   GET /health

The user is OpenAI's `user` field, or `user_id` / `user_text` in the body (the `openai` client's `extra_body`).
Every answer says whose it is: `"prlhf": {"user_id": ..., "personalized": false}` for an unseen user, who gets
the generic user 0. Errors are OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with a 4xx for
anything the client can fix (the message names the field or the limit); a 500 means a bug here.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.engine import Admitted, AsyncStream, GenerationRequest, QueueFull, RequestDone, SequenceDone, TextDelta
from serving.protocol import (APIError, ChatCompletionRequest, CompletionRequest, OnboardRequest, RewardRequest,
                              check_user_id)
from serving.service import Service, chat_prompt_ids, completion_prompt_ids
from serving.users import OnboardingError

log = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.25


def _error(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
           code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(APIError(status, message, type, param, code).body(), status_code=status, headers=headers)


TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "is-instance", "union"}


def _param(loc) -> str | None:
    """A pydantic error location as a field path, 'messages[0].content' (without 'body' and union type tags)."""
    out = ""
    for x in loc:
        if x == "body" and not out:
            continue
        if isinstance(x, int):
            out += f"[{x}]"
        elif "[" in x or "(" in x or x in TYPE_TAGS:
            break  # pydantic names the union member that failed ('stop.list[str]'): the field is enough
        else:
            out += f".{x}" if out else x
    return out or None


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first problem of a request body, as 'field: what is wrong' (and the field as OpenAI's `param`)."""
    err = exc.errors()[0]
    if err.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}", None
    param = _param(err.get("loc", ()))
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    return (f"{param}: {msg}" if param else msg), param


def _prlhf(admitted: Admitted | None, user_id: str | None) -> dict:
    if admitted is None:
        return {"user_id": user_id, "personalized": False}
    return {"user_id": admitted.user.user_id, "personalized": admitted.user.personalized}


def create_app(service: Service, max_body_bytes: int = 4 * 2**20) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        yield
        service.close()

    limit = {"max_body_size": max_body_bytes} if "max_body_size" in inspect.signature(FastAPI).parameters else {}
    app = FastAPI(title="P-RLHF personalized serving", version="1", lifespan=lifespan, **limit)  # 413 past it
    app.state.service = service

    # ---------------------------------------------------------------------------------------------- errors

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return _error(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(exc.status_code, str(exc.detail), type=kind)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return _error(500, f"internal server error: {type(exc).__name__}", type="server_error")

    # ---------------------------------------------------------------------------------------------- info

    @app.get("/health")
    async def health():
        out = {"status": "ok", "model": service.model_id, **service.describe()}
        if service.engine is not None:
            out["queue"] = {"waiting": service.engine.waiting, "running": service.engine.running,
                            "max_batch": service.engine.max_batch, "max_queue": service.engine.max_queue}
        return out

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": service.model_id, "object": "model",
                                            "created": int(service.run_dir.stat().st_mtime), "owned_by": "p-rlhf",
                                            "prlhf": service.describe()}]}

    @app.get("/v1/users")
    async def list_users(limit: int = Query(1000, ge=1, le=100000), offset: int = Query(0, ge=0)):
        return service.users.list(limit, offset)

    @app.get("/v1/users/{user_id:path}")
    async def user_status(user_id: str):
        try:
            user_id = check_user_id(user_id, "user_id")
        except ValueError as exc:
            raise APIError(400, str(exc), param="user_id") from None
        return service.users.status(user_id)

    @app.post("/v1/users", status_code=202)
    async def onboard(body: OnboardRequest):
        try:
            return service.users.onboard(body.user_id, [c.model_dump() for c in body.comparisons], body.steps,
                                         body.lr, body.overwrite)
        except OnboardingError as exc:
            kind = "rate_limit_error" if exc.status == 429 else "invalid_request_error"
            raise APIError(exc.status, str(exc), type=kind, param=exc.param) from None

    # ---------------------------------------------------------------------------------------------- generation

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        service.require(policy=True)
        service.check_model(body.model)
        prompt = service.check_prompt(chat_prompt_ids(service.encoder, body.messages), "messages")
        params, n = service.sampling(body, body.max_new_tokens)
        gen = GenerationRequest(prompt, params, body.resolved_user_id, body.user_text, n)
        stream = service.open([gen])
        meta = _Meta("chatcmpl", service.model_id, body.resolved_user_id, n)
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return _sse(_chat_chunks(stream, meta, usage), stream)
        result = await _collect(stream, request, n)
        if result is None:
            return _error(499, "client closed the request")
        admitted, choices, error = result
        if error:
            return _error(500, error, type="server_error")
        return {"id": meta.id, "object": "chat.completion", "created": meta.created, "model": meta.model,
                "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                             "logprobs": None, "finish_reason": c.finish_reason} for c in choices],
                "usage": _usage(admitted, choices), "prlhf": _prlhf(admitted[0] if admitted else None, meta.user_id)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        service.require(policy=True)
        service.check_model(body.model)
        params, n = service.sampling(body, body.max_new_tokens)
        gens = []
        for i, text in enumerate(body.prompts):
            param = "prompt" if isinstance(body.prompt, str) else f"prompt[{i}]"
            ids = service.check_prompt(completion_prompt_ids(service.tokenizer, text), param)
            gens.append(GenerationRequest(ids, params, body.resolved_user_id, body.user_text, n))
        stream = service.open(gens)
        meta = _Meta("cmpl", service.model_id, body.resolved_user_id, n)
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return _sse(_completion_chunks(stream, meta, usage), stream)
        result = await _collect(stream, request, n)
        if result is None:
            return _error(499, "client closed the request")
        admitted, choices, error = result
        if error:
            return _error(500, error, type="server_error")
        return {"id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model,
                "choices": [{"index": c.index, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
                            for c in choices],
                "usage": _usage(admitted, choices), "prlhf": _prlhf(admitted[0] if admitted else None, meta.user_id)}

    # ---------------------------------------------------------------------------------------------- rewards

    @app.post("/v1/rewards")
    async def rewards(body: RewardRequest):
        service.require(policy=False)
        service.check_model(body.model)
        scorer = service.scorer
        service.check_prompt(chat_prompt_ids(scorer.encoder, [_user_message(body.prompt)]), "prompt")
        limit = scorer.encoder.max_response
        for i, text in enumerate(body.responses):
            n_tok = len(scorer.tokenizer(text, add_special_tokens=False).input_ids) + 1  # + EOS, as in training
            if n_tok > limit:
                raise APIError(400, f"responses[{i}] has {n_tok} tokens with EOS, more than this reward model's "
                                    f"limit of {limit} (data.max_response_length)", param=f"responses[{i}]",
                               code="context_length_exceeded")
        try:
            scorer.reserve()
        except QueueFull as exc:
            raise APIError(429, f"the server is busy: {exc}; retry later", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        uid = body.resolved_user_id
        values, resolved = await run_in_threadpool(scorer.score, body.prompt, body.responses, uid, body.user_text)
        ranking = sorted(range(len(values)), key=lambda i: -values[i])
        return {"object": "list", "model": service.model_id,
                "data": [{"object": "reward", "index": i, "reward": v} for i, v in enumerate(values)],
                "ranking": ranking, "best": ranking[0],
                "prlhf": {"user_id": resolved.user_id, "personalized": resolved.personalized}}

    return app


# ---------------------------------------------------------------------------------------------------- helpers


def _user_message(text: str):
    from serving.protocol import ChatMessage

    return ChatMessage(role="user", content=text)


class _Meta:
    """Fields every response (and chunk) of one request repeats."""

    def __init__(self, prefix: str, model: str, user_id: str | None, n: int):
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model, self.user_id, self.n = model, user_id, n


def _choice_index(k: int, index: int, n: int) -> int:
    return k * n + index  # prompt k's choice `index` (completions with a list of prompts)


class _Choice:
    def __init__(self, index: int, done: SequenceDone):
        self.index, self.text, self.finish_reason = index, done.text, done.finish_reason
        self.completion_tokens = done.completion_tokens


def _usage(admitted: list[Admitted], choices: list[_Choice]) -> dict:
    prompt = sum(a.prompt_tokens for a in admitted)
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _collect(stream: AsyncStream, request: Request, n: int):
    """All events of a non-streamed request -> (admitted per prompt, choices, error). Returns None when the client
    disconnected: checked every DISCONNECT_POLL_S while waiting, and its rows are cancelled, freeing their slots."""
    admitted, choices, error = {}, [], None
    it = stream.__aiter__()
    next_check = time.monotonic() + DISCONNECT_POLL_S
    try:
        while True:
            try:
                k, ev = await asyncio.wait_for(it.__anext__(), DISCONNECT_POLL_S)
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                ev = None
            if time.monotonic() >= next_check:  # events may keep coming: look at the client on a clock
                next_check = time.monotonic() + DISCONNECT_POLL_S
                if await request.is_disconnected():
                    stream.cancel()
                    return None
            if isinstance(ev, Admitted):
                admitted[k] = ev
            elif isinstance(ev, SequenceDone):
                choices.append(_Choice(_choice_index(k, ev.index, n), ev))
            elif isinstance(ev, RequestDone) and ev.error:
                error = ev.error
    except asyncio.CancelledError:
        stream.cancel()
        raise
    choices.sort(key=lambda c: c.index)
    return [admitted[k] for k in sorted(admitted)], choices, error


def _sse(chunks: AsyncIterator[dict], stream: AsyncStream) -> StreamingResponse:
    async def body():
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or we are done): free the request's rows
            stream.cancel()

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _events(stream: AsyncStream, meta: _Meta):
    """(kind, payload) of a stream: ('start', prlhf), ('delta', (index, text)), ('done', (index, reason)),
    ('usage', dict), ('error', message)."""
    admitted, choices = [], []
    started = False
    async for k, ev in stream:
        if isinstance(ev, Admitted):
            admitted.append(ev)
            if not started:
                started = True
                yield "start", _prlhf(ev, meta.user_id)
        elif isinstance(ev, TextDelta):
            yield "delta", (_choice_index(k, ev.index, meta.n), ev.text)
        elif isinstance(ev, SequenceDone):
            c = _Choice(_choice_index(k, ev.index, meta.n), ev)
            choices.append(c)
            yield "done", (c.index, c.finish_reason)
        elif isinstance(ev, RequestDone) and ev.error:
            yield "error", ev.error
            return
    yield "usage", _usage(admitted, choices)


async def _chat_chunks(stream: AsyncStream, meta: _Meta, include_usage: bool):
    prlhf = None

    def chunk(choices, **extra):
        out = {"id": meta.id, "object": "chat.completion.chunk", "created": meta.created, "model": meta.model,
               "choices": choices, "prlhf": prlhf}
        if include_usage:
            out["usage"] = None
        out.update(extra)
        return out

    async for kind, payload in _events(stream, meta):
        if kind == "start":
            prlhf = payload
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for i in range(meta.n)])
        elif kind == "delta":
            i, text = payload
            yield chunk([{"index": i, "delta": {"content": text}, "logprobs": None, "finish_reason": None}])
        elif kind == "done":
            i, reason = payload
            yield chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": reason}])
        elif kind == "error":
            yield APIError(500, payload, type="server_error").body()
        elif kind == "usage" and include_usage:
            yield chunk([], usage=payload)


async def _completion_chunks(stream: AsyncStream, meta: _Meta, include_usage: bool):
    prlhf = None

    def chunk(choices, **extra):
        out = {"id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model,
               "choices": choices, "prlhf": prlhf}
        if include_usage:
            out["usage"] = None
        out.update(extra)
        return out

    async for kind, payload in _events(stream, meta):
        if kind == "start":
            prlhf = payload
        elif kind == "delta":
            i, text = payload
            yield chunk([{"index": i, "text": text, "logprobs": None, "finish_reason": None}])
        elif kind == "done":
            i, reason = payload
            yield chunk([{"index": i, "text": "", "logprobs": None, "finish_reason": reason}])
        elif kind == "error":
            yield APIError(500, payload, type="server_error").body()
        elif kind == "usage" and include_usage:
            yield chunk([], usage=payload)
