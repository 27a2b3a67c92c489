"""The OpenAI-compatible HTTP API over an `EngineLoop` (FastAPI).

    GET  /v1/models            the one model served
    POST /v1/completions       prompt: a string or token ids (or a list of one of those)
    POST /v1/chat/completions  messages, rendered with the model's chat template
    GET  /health, GET /metrics (Prometheus text)

Both POST routes take `stream` (server-sent events in OpenAI's chunk schema, then `data: [DONE]`),
`max_tokens` / `max_completion_tokens` (default: the rest of the context), `temperature`
(default 1), `top_p`, `top_k` (an extension), `seed`, `stop`, `ignore_eos` (extension),
`stream_options.include_usage`, and `n` = 1 only. Every error is OpenAI's
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from numbers import Integral, Real
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import Engine
from ..prompts import normalize_prompts
from ..sampling import SamplingParams
from .loop import EngineLoop, Event, QueueFull, Submission

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "abort": "abort"}
DISCONNECT_POLL_S = 0.5  # how often a non-streaming handler checks that its client is still there


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, type: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.type = type or {400: "invalid_request_error", 404: "not_found_error", 429: "rate_limit_error",
                             503: "service_unavailable"}.get(status, "server_error")

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code, self.headers)


def error_response(status: int, message: str, type: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}},
                        status_code=status, headers=headers)


# -- request parsing ------------------------------------------------------------------------------

def _field(body: dict, name: str, kinds: tuple, what: str, default=None):
    v = body.get(name)
    if v is None:
        return default
    ok = isinstance(v, kinds) and not (isinstance(v, bool) and bool not in kinds)
    if not ok:
        raise APIError(400, f"'{name}' must be {what}, got {json.dumps(v)[:80]}", param=name)
    return v


def parse_sampling(body: dict, engine: Engine, prompt_len: int) -> SamplingParams:
    n = _field(body, "n", (Integral,), "an integer", 1)
    if n != 1:
        raise APIError(400, f"only n=1 is supported, got n={n}", param="n")
    if _field(body, "best_of", (Integral,), "an integer", 1) != 1:
        raise APIError(400, "only best_of=1 is supported", param="best_of")
    if body.get("logprobs") not in (None, False) or body.get("top_logprobs") is not None:
        raise APIError(400, "logprobs are not supported", param="logprobs")
    max_new = _field(body, "max_completion_tokens", (Integral,), "an integer")
    if max_new is None:
        max_new = _field(body, "max_tokens", (Integral,), "an integer")
    else:
        _field(body, "max_tokens", (Integral,), "an integer")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    if max_new is None:  # the rest of the context, or of the page pool if that is smaller
        alloc, page = engine.scheduler.allocator, engine.spec.sparse.page_size
        max_new = max(1, min(engine.max_tokens, (alloc.num_pages - 1) * page) - prompt_len)
    elif max_new < 1:
        raise APIError(400, f"'{name}' must be >= 1, got {max_new}", param=name)
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str)
                                                                                            for s in stop))):
        raise APIError(400, f"'stop' must be a string or a list of strings, got {json.dumps(stop)[:80]}",
                       param="stop")
    stop = (stop,) if isinstance(stop, str) else tuple(s for s in stop or () if s)
    top_k = _field(body, "top_k", (Integral,), "an integer", 0)
    kw = dict(max_new_tokens=int(max_new),
              temperature=float(_field(body, "temperature", (Real,), "a number", 1.0)),
              top_p=float(_field(body, "top_p", (Real,), "a number", 1.0)),
              top_k=0 if top_k == -1 else int(top_k),  # -1: off, as vLLM spells it
              seed=_field(body, "seed", (Integral,), "an integer"),
              stop=stop, ignore_eos=_field(body, "ignore_eos", (bool,), "true or false", False))
    try:
        return SamplingParams(**kw)
    except ValueError as e:
        param = next((k for k in kw if str(e).startswith(k)), None)
        raise APIError(400, str(e).replace("max_new_tokens", name), param=param) from None


def parse_stream(body: dict) -> tuple[bool, bool]:
    stream = _field(body, "stream", (bool,), "true or false", False)
    opts = _field(body, "stream_options", (dict,), "an object", {})
    usage = _field(opts, "include_usage", (bool,), "true or false", False)
    return stream, usage


def completion_prompt(body: dict, engine: Engine) -> list[int]:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # a batch of one
    if isinstance(p, str):
        try:
            return engine.tokenize([p])[0]
        except ValueError as e:
            raise APIError(400, str(e), param="prompt") from None
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        try:
            return engine.tokenize([p])[0]
        except ValueError as e:
            raise APIError(400, str(e), param="prompt") from None
    if isinstance(p, list) and len(p) > 1:
        raise APIError(400, "one prompt per request is supported (a string or a list of token ids)", param="prompt")
    raise APIError(400, f"'prompt' must be a non-empty string or list of token ids, got {json.dumps(p)[:80]}",
                   param="prompt")


def chat_prompt(body: dict, engine: Engine) -> list[int]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
        raise APIError(400, "'messages' must be a non-empty list of {'role', 'content'} objects", param="messages")
    flat = []
    for i, m in enumerate(msgs):
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text ones
            if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                       for c in content):
                raise APIError(400, f"message {i}: only text content parts are supported", param="messages")
            content = "".join(c["text"] for c in content)
        flat.append({"role": m.get("role"), "content": content})
    if engine.tokenizer is None:
        raise APIError(400, "this model has no tokenizer; chat needs one", param="messages")
    try:
        (ids,) = normalize_prompts([flat], engine.tokenizer)
    except (ValueError, TypeError) as e:
        raise APIError(400, str(e).replace("prompt 0: chat message", "message"), param="messages") from None
    return ids


# -- detokenization ---------------------------------------------------------------------------------

class Detokenizer:
    """Text deltas of a growing token list. Holds back an incomplete UTF-8 sequence and any text
    that may be the start of a stop string; the stop string and what follows are never sent."""

    def __init__(self, tokenizer, stops: tuple[str, ...]):
        self.tok, self.stops = tokenizer, stops
        self.holdback = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []
        self.sent = ""

    def _text(self) -> str:
        if self.tok is None:
            return ""
        text = self.tok.decode(self.ids)
        cuts = [text.find(s) for s in self.stops if s in text]
        return text[: min(cuts)] if cuts else text

    def push(self, ids: list[int]) -> str:
        self.ids += ids
        text = self._text()
        if text.endswith("\ufffd"):
            return ""
        safe = text[: len(text) - self.holdback] if self.holdback else text
        return self._advance(safe)

    def finish(self) -> str:
        return self._advance(self._text())

    def _advance(self, text: str) -> str:
        if len(text) > len(self.sent) and text.startswith(self.sent):
            delta, self.sent = text[len(self.sent):], text
            return delta
        return ""


# -- the app ----------------------------------------------------------------------------------------

def create_app(engine: Engine, *, model_name: str = "lserve_jax", max_queue: int = 256,
               loop: EngineLoop | None = None) -> FastAPI:
    """The FastAPI app; its lifespan starts the engine loop thread and stops it (aborting every
    request in flight) at shutdown. `app.state.loop` is the EngineLoop."""
    loop = loop or EngineLoop(engine, max_queue=max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        loop.start()
        try:
            yield
        finally:
            loop.stop()

    app = FastAPI(title="lserve_jax", lifespan=lifespan)
    app.state.loop = loop
    created = int(time.time())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
        msg = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        return error_response(exc.status_code, msg, kind)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    @app.get("/health")
    async def health():
        if not loop.accepting:
            return error_response(503, "shutting down", "service_unavailable")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(loop.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "lserve_jax", "max_model_len": engine.max_tokens}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _json_body(request)
        return await _serve(request, body, completion_prompt(body, engine), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _json_body(request)
        return await _serve(request, body, chat_prompt(body, engine), chat=True)

    async def _serve(request: Request, body: dict, ids: list[int], chat: bool):
        _field(body, "model", (str,), "a string")
        sampling = parse_sampling(body, engine, len(ids))
        stream, include_usage = parse_stream(body)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        sub = Submission(rid, ids, sampling, asyncio.get_running_loop())
        try:
            loop.submit(sub)
        except QueueFull as e:
            status = 503 if not loop.accepting else 429
            raise APIError(status, str(e), headers={"Retry-After": "1"}) from None
        ev = await sub.events.get()  # "admitted" or an "error" (too long for the model or the pool)
        if ev.kind == "error":
            raise APIError(ev.status, ev.error, param="messages" if chat else "prompt",
                           code="context_length_exceeded" if ev.status == 400 else None)
        detok = Detokenizer(engine.tokenizer, sampling.stop)
        common = dict(id=rid, created=int(time.time()), model=body.get("model") or model_name)
        if stream:
            return StreamingResponse(_stream(request, sub, detok, common, chat, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        done = False
        try:
            text, reason, count, cached = "", None, 0, 0
            while True:
                try:
                    ev = await asyncio.wait_for(sub.events.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return Response(status_code=499)  # the finally aborts it
                    continue
                if ev.kind == "error":
                    done = True
                    raise APIError(ev.status, ev.error)
                count += len(ev.token_ids)
                cached = ev.cached_tokens
                text += detok.push(ev.token_ids)
                if ev.kind == "finished":
                    done = True
                    text += detok.finish()
                    reason = FINISH_REASONS.get(ev.finish_reason, ev.finish_reason)
                    break
        finally:
            if not done:
                loop.abort(rid)
        usage = _usage(len(ids), count, cached)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": reason}
            return {**common, "object": "chat.completion", "choices": [choice], "usage": usage}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        return {**common, "object": "text_completion", "choices": [choice], "usage": usage}

    async def _stream(request: Request, sub: Submission, detok: Detokenizer, common: dict, chat: bool,
                      include_usage: bool):
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, reason: str | None = None, *, role: bool = False) -> str:
            if chat:
                d = {"role": "assistant", "content": ""} if role else ({} if delta is None else {"content": delta})
                choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": reason}
            payload = {**common, "object": obj, "choices": [choice]}
            if include_usage:
                payload["usage"] = None
            return f"data: {json.dumps(payload)}\n\n"

        done, count = False, 0
        try:
            if chat:
                yield chunk(None, role=True)
            while True:
                ev: Event = await sub.events.get()
                if ev.kind == "error":
                    done = True
                    err = {"error": {"message": ev.error, "type": "server_error", "param": None, "code": None}}
                    yield f"data: {json.dumps(err)}\n\n"
                    break
                count += len(ev.token_ids)
                delta = detok.push(ev.token_ids)
                if ev.kind == "finished":
                    done = True
                    delta += detok.finish()
                    if delta:
                        yield chunk(delta)
                    yield chunk(None, FINISH_REASONS.get(ev.finish_reason, ev.finish_reason))
                    if include_usage:
                        usage = _usage(len(sub.prompt_ids), count, ev.cached_tokens)
                        yield f"data: {json.dumps({**common, 'object': obj, 'choices': [], 'usage': usage})}\n\n"
                    break
                if delta:
                    yield chunk(delta)
            yield "data: [DONE]\n\n"
        finally:
            if not done:  # the client went away (the response task was cancelled): free its pages now
                loop.abort(sub.request_id)

    return app


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _usage(prompt: int, completion: int, cached: int) -> dict:
    """OpenAI's usage object; prompt_tokens_details.cached_tokens: what the prefix cache supplied."""
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}
