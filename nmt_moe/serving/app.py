"""Translation over HTTP (FastAPI + uvicorn), started by `nmt-moe serve -m MODEL [--host H] [--port P]`
(nmt_moe/cli/serve.py).

    POST /translate  {"text": ["...", ...], "beam": 5, "nbest": 1, "target_lang": null}
                  -> {"translations": ["...", ...]}           (nbest > 1: a list of n strings per line)
    GET  /health  -> 200 {"status": "ok", ...batching counters} while the model worker runs (503 if not)

Each line is translated as `nmt-moe translate` translates it with the same model options (one output
line per input line, empty lines stay empty, over-long lines are truncated). Concurrent requests are
batched by one model worker (batcher.py). Bad requests get a 4xx JSON `{"error": ...}` and the server
goes on: malformed JSON (400), wrong fields or values (422), a body over --max-request-bytes or more than
--max-request-lines lines (413), an unknown target language (400).

The address is bound first, then the model is loaded: a port in use or a bad model path stops `serve` with
one line and exit 2 before the server answers anything.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from nmt_moe.data.text_io import encode_sources, target_prefix
from nmt_moe.decoding.options import BatchOptions, DecodeOptions
from nmt_moe.serving.batcher import DynamicBatcher, Settings


class TranslateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    text: list[str] = Field(min_length=1)
    beam: int | None = Field(default=None, ge=1)  # None: the server's --beam
    nbest: int = Field(default=DecodeOptions.nbest, ge=1)
    target_lang: str | None = None


@dataclass(frozen=True)
class Limits:
    max_request_lines: int = 256
    max_request_bytes: int = 1 << 20
    max_beam: int = 16
    max_input_tokens: int = BatchOptions.max_input_tokens


class RequestError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def parse_request(body: bytes) -> TranslateRequest:
    """The request from raw JSON (any Content-Type), or RequestError: 400 if not JSON, else 422."""
    try:
        return TranslateRequest.model_validate_json(body)
    except ValidationError as error:
        first = error.errors()[0]
        if first.get("type") == "json_invalid":
            raise RequestError(400, "the body is not valid JSON") from None
        where = ".".join(str(part) for part in first.get("loc", ()))
        raise RequestError(422, f"{where or 'body'}: {first.get('msg', 'invalid')}") from None


def create_app(batcher: DynamicBatcher, limits: Limits, default_beam: int) -> FastAPI:
    """The FastAPI app; the batcher's worker runs for the app's lifetime."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        await asyncio.to_thread(batcher.close)

    app = FastAPI(title="nmt-moe", lifespan=lifespan)

    @app.middleware("http")
    async def body_limit(request: Request, call_next: Any) -> Any:
        """Refuse an oversized body from its Content-Length, before reading it."""
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limits.max_request_bytes:
            return error_response(413, f"body over {limits.max_request_bytes} bytes")
        return await call_next(request)

    @app.get("/health")
    async def health() -> JSONResponse:
        status = 200 if batcher.alive else 503
        return JSONResponse({"status": "ok" if status == 200 else "down", **asdict(batcher.stats)}, status)

    @app.post("/translate")
    async def translate(request: Request) -> JSONResponse:
        try:
            body = parse_request(await request.body())
            sources, settings = prepare(body, batcher, limits, default_beam)
        except RequestError as error:
            return error_response(error.status, str(error))
        texts = await asyncio.wrap_future(batcher.submit(sources, settings))
        if settings.nbest == 1:
            return JSONResponse({"translations": [nbest[0] for nbest in texts]})
        return JSONResponse({"translations": texts})

    return app


def prepare(
    body: TranslateRequest, batcher: DynamicBatcher, limits: Limits, default_beam: int
) -> tuple[list[list[int]], Settings]:
    """Checked request -> model input ids and search settings (RequestError for what the model refuses)."""
    if len(body.text) > limits.max_request_lines:
        raise RequestError(413, f"{len(body.text)} lines; at most {limits.max_request_lines} per request")
    beam = default_beam if body.beam is None else body.beam
    if beam > limits.max_beam:
        raise RequestError(422, f"beam: at most {limits.max_beam}, got {beam}")
    if body.nbest > beam:
        raise RequestError(422, f"nbest: at most beam ({beam}), got {body.nbest}")
    if any("\n" in line or "\r" in line for line in body.text):
        raise RequestError(422, "text: one line per item, without newline characters")
    tokenizer = batcher.tokenizer
    try:
        prefix = target_prefix(tokenizer, body.target_lang)
    except KeyError:
        raise RequestError(400, f"target_lang: the model has no tag for {body.target_lang!r}") from None
    sources = encode_sources(body.text, tokenizer, max_input_tokens=limits.max_input_tokens, prefix=prefix)
    return sources, Settings(beam, body.nbest)
