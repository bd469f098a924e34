"""OpenAI-style error bodies: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from ..errors import GrkvError


class QueueFullError(Exception):
    """Every place in the request queue is taken."""


def _body(message: str, kind: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def install(app):
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        parts = []
        for e in exc.errors():
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
        return JSONResponse(_body("; ".join(parts) or "invalid request", "invalid_request_error"), status_code=400)

    @app.exception_handler(GrkvError)
    async def _grkv(request: Request, exc: GrkvError):
        return JSONResponse(_body(f"{type(exc).__name__}: {exc}", "invalid_request_error"), status_code=400)

    @app.exception_handler(QueueFullError)
    async def _full(request: Request, exc: QueueFullError):
        return JSONResponse(_body(str(exc), "server_busy", code="queue_full"), status_code=503,
                            headers={"Retry-After": "1"})
