"""The HTTP side that the endpoint's server (jobs/serve_server.py) and a versioned endpoint's router
(jobs/serve_router.py) share: OpenAI error bodies, request ids, the API key check, bounded JSON bodies.

Hostile traffic: a JSON endpoint takes only `Content-Type: application/json` (415; a web page can
POST text/plain to 127.0.0.1 without asking) and reads at most max_body_bytes (413, at once when
Content-Length says so). Every response carries Serve's `x-request-id` header; an internal error
answers 500 with a generic message naming that id, and the traceback goes to the replica's log under it.
"""

import hmac
import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from rayrlhf.actors.serving.openai_schema import OpenAIError

logger = logging.getLogger("ray.serve")


def request_id(request: Request) -> str:
    """Serve's id of this request: its proxy sets (or keeps the client's) x-request-id on the way
    in and puts it on every response; the replica's log lines carry it too."""
    rid = request.headers.get("x-request-id")
    if rid is None:  # not behind Serve's proxy
        if not hasattr(request.state, "request_id"):
            request.state.request_id = uuid.uuid4().hex
        rid = request.state.request_id
    return rid


def _error(request: Request, err: OpenAIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def internal_error(rid: str, err: BaseException) -> OpenAIError:
    """A generic 500 naming the request id; the details go to the server log only."""
    logger.error("request %s failed: %s: %s", rid, type(err).__name__, err, exc_info=err)
    return OpenAIError(500, f"internal server error (request id {rid}; details are in the server log)",
                       type="server_error")


async def _openai_error(request: Request, err: OpenAIError) -> JSONResponse:
    return _error(request, err)


async def _http_error(request: Request, err: HTTPException) -> JSONResponse:
    return _error(request, OpenAIError(err.status_code, str(err.detail), code=str(err.status_code)))


async def _server_error(request: Request, err: Exception) -> JSONResponse:
    return _error(request, internal_error(request_id(request), err))


def openai_app(title: str) -> FastAPI:
    """A FastAPI app whose every error is an OpenAI error body (an unexpected one a generic 500)."""
    app = FastAPI(title=title, docs_url=None, redoc_url=None)
    app.exception_handler(OpenAIError)(_openai_error)
    app.exception_handler(HTTPException)(_http_error)
    app.exception_handler(Exception)(_server_error)
    return app


def answered(reply: tuple) -> Any:
    """The value of a ("ok", value) reply (the state actor's, a version's), or its ("error", status, body) raised."""
    if reply[0] == "ok":
        return reply[1]
    error = reply[2]["error"]
    raise OpenAIError(reply[1], error["message"], error["param"], error["type"], error["code"])


def authorize(token: str | None, request: Request) -> None:
    """401 unless the request carries `Authorization: Bearer <token>` (nothing to check without a token)."""
    if token is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise OpenAIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")


async def json_body(request: Request, cap: int) -> bytes:
    """The body of a JSON request, 415 / 413 before any of it is parsed: at most cap (+1) bytes are
    read, none when Content-Length is already above it."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        raise OpenAIError(415, f"Content-Type must be application/json, not {media_type or 'none'!r}",
                          code="unsupported_media_type")
    too_large = OpenAIError(413, f"the request body is larger than this server's max_body_bytes={cap}",
                            code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > cap:
            raise too_large
    return bytes(body)
