"""Errors on the OpenAI-compatible routes use OpenAI's envelope, so SDKs raise their usual exceptions."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from app import json_text
from app.audit.context import note_error
from app.errors import AppError, Unauthenticated
from app.middleware import request_id_var
from app.problems import http_error, validation_error


def openai_error_response(error: AppError) -> Response:
    note_error(error.code)
    kind = "invalid_request_error" if 400 <= error.status < 500 else "api_error"
    if isinstance(error, Unauthenticated):
        kind = "authentication_error"
    body = {
        "error": {
            "message": error.detail,
            "type": kind,
            "param": None,
            "code": error.code,
            "request_id": request_id_var.get(),
        }
    }
    return Response(
        json_text.dumps(body), status_code=error.status, media_type="application/json", headers=error.response_headers()
    )


Handler = Callable[[Request], Coroutine[Any, Any, Response]]


class OpenAIErrorRoute(APIRoute):
    """A route whose errors (auth, validation, limits, upstream) render in OpenAI's error format."""

    def get_route_handler(self) -> Handler:
        return with_openai_errors(super().get_route_handler())


def with_openai_errors(handler: Handler) -> Handler:
    """`handler`, its errors in OpenAI's envelope (also on the fast path, app/fast_path.py)."""

    async def handle(request: Request) -> Response:
        try:
            return await handler(request)
        except AppError as exc:
            return openai_error_response(exc)
        except RequestValidationError as exc:
            return openai_error_response(validation_error(exc))
        except HTTPException as exc:  # also a body over the limit while it was read (app/middleware.py)
            return openai_error_response(http_error(exc))

    return handle
