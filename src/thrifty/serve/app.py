"""The HTTP service (FastAPI + uvicorn) around a `GatherEngine`: bearer-token authentication on every endpoint
but /health, request-body and batch-size limits, 4xx answers for malformed input, a bounded queue in front of
one model worker (thrifty.serve.engine.Batcher). Wire format: thrifty.backbones.remote.protocol."""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from thrifty.backbones.remote.protocol import GATHER, HEALTH, INFO
from thrifty.serve.engine import Batcher, Busy, GatherEngine, Limits, RequestError


def create_app(engine: GatherEngine, token: str, limits: Limits | None = None):
    """The ASGI app. `token`: the bearer token every request but /health must carry."""
    limits = limits or Limits()
    batcher = Batcher(engine, limits)
    expected = token.encode()

    @asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="thrifty feature server", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.batcher = batcher

    def authorized(request: Request) -> None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            raise HTTPException(
                401,
                "missing or wrong bearer token; send `Authorization: Bearer <token>` with the server's token",
                headers={"WWW-Authenticate": "Bearer"},
            )

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError):
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

    @app.get(HEALTH)
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(INFO, dependencies=[Depends(authorized)])
    async def info() -> dict[str, Any]:
        return {**engine.info(), "limits": limits.describe(), "stats": dict(batcher.stats)}

    @app.post(GATHER, dependencies=[Depends(authorized)])
    async def gather(request: Request) -> Response:
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            raise RequestError(415, "send the request body as application/json")
        body = await read_limited(request, limits.max_body_bytes)
        job = await run_in_threadpool(parse_body, engine, body, limits)
        try:
            data = await batcher.submit(job)
        except Busy:
            raise RequestError(503, "the request queue is full; retry later") from None
        except TimeoutError:
            raise RequestError(503, "the request waited too long for the model; retry later") from None
        return Response(data, media_type="application/octet-stream")

    return app


async def read_limited(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it exceeds `limit` bytes (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(400, "invalid Content-Length")
        if int(declared) > limit:
            raise RequestError(413, f"request body of {int(declared)} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_body(engine: GatherEngine, body: bytes, limits: Limits):
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise RequestError(400, f"the body is not valid JSON ({exc})") from None
    return engine.parse(payload, limits)


def run_server(
    engine: GatherEngine,
    token: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    limits: Limits | None = None,
    lifetime: float | None = None,
    log_level: str = "warning",
) -> None:
    """Serve until interrupted (or for `lifetime` seconds). Prints `listening on http://HOST:PORT` once ready
    (with --port 0 the port the system chose)."""
    import uvicorn

    limits = limits or Limits()

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            bound = self.servers[0].sockets[0].getsockname()[1] if self.servers else port
            print(f"thrifty serve: listening on http://{host}:{bound}", flush=True)

    config = uvicorn.Config(
        create_app(engine, token, limits),
        host=host,
        port=port,
        log_level=log_level,
        limit_concurrency=limits.queue_size + 32,  # connections beyond this get 503 at once
        timeout_keep_alive=5,
    )
    server = Server(config)
    if lifetime:
        timer = threading.Timer(lifetime, lambda: setattr(server, "should_exit", True))
        timer.daemon = True
        timer.start()
    asyncio.run(server.serve())
