"""Errors on the OpenAI-compatible routes use OpenAI's envelope, so SDKs raise their usual exceptions."""

from __future__ import annotations

from fastapi.routing import APIRoute
from starlette.responses import Response

from app import json_text
from app.audit.context import note_error
from app.errors import AppError, Unauthenticated
from app.middleware import request_id_var
from app.problems import Handler, rendering_errors


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


class OpenAIErrorRoute(APIRoute):
    """A route whose errors (auth, validation, limits, upstream) render in OpenAI's error format (the fast
    path, app/fast_path.py, renders the chat route's the same way)."""

    def get_route_handler(self) -> Handler:
        return rendering_errors(super().get_route_handler(), openai_error_response)
