"""Renders every error once, as application/problem+json with a stable code and the request id."""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from app import json_text
from app.audit.context import note_error
from app.errors import (
    AppError,
    InvalidRequest,
    MalformedJSON,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
)
from app.middleware import request_id_var

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the problem+json errors a route may answer with."""
    described = {"content": {PROBLEM_JSON: {}}, "description": "A problem+json error"}
    return {status: described for status in statuses}


_BY_STATUS: dict[int, type[AppError]] = {
    404: NotFound,
    405: MethodNotAllowed,
    413: PayloadTooLarge,
}


def problem_response(error: AppError) -> Response:
    note_error(error.code)
    return Response(
        json_text.dumps(error.problem(request_id_var.get())),
        status_code=error.status,
        media_type=PROBLEM_JSON,
        headers=error.response_headers(),
    )


def validation_error(exc: RequestValidationError) -> AppError:
    errors = exc.errors()
    if any(err.get("type") == "json_invalid" for err in errors):
        return MalformedJSON("The request body is not valid JSON.")
    problems = [
        {"loc": [str(part) for part in err.get("loc", ())], "msg": err.get("msg", ""), "type": err.get("type", "")}
        for err in errors
    ]
    summary = "; ".join(f"{'.'.join(p['loc'])}: {p['msg']}" for p in problems[:5])
    return InvalidRequest(summary or "The request is invalid.", extra={"errors": problems})


def http_error(exc: StarletteHTTPException) -> AppError:
    error_class = _BY_STATUS.get(exc.status_code)
    if error_class is not None:
        return error_class(None if exc.detail in (None, "") else str(exc.detail), headers=dict(exc.headers or {}))
    error = AppError(str(exc.detail), headers=dict(exc.headers or {}))
    error.status = exc.status_code
    return error


Handler = Callable[[Request], Coroutine[Any, Any, Response]]


def rendering_errors(handler: Handler, render: Callable[[AppError], Response]) -> Handler:
    """`handler`, its errors (refusals, validation, HTTP errors such as a body over the limit while it
    was read) rendered by `render`: problem_response as the handlers installed below do, or a route's
    own envelope (OpenAI's). For a route served outside FastAPI's exception middleware (app/fast_path.py)
    or with its own envelope; unexpected errors are the caller's."""

    async def handle(request: Request) -> Response:
        try:
            return await handler(request)
        except AppError as exc:
            return render(exc)
        except RequestValidationError as exc:
            return render(validation_error(exc))
        except StarletteHTTPException as exc:
            return render(http_error(exc))

    return handle


async def _on_app_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, AppError)
    return problem_response(exc)


async def _on_validation_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    return problem_response(validation_error(exc))


async def _on_http_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    return problem_response(http_error(exc))


async def _on_unexpected(request: Request, exc: Exception) -> Response:
    return unexpected_error_response(request.method, request.url.path, exc)


def unexpected_error_response(method: str, path: str, exc: BaseException) -> Response:
    """The 500 of an exception no handler took, logged with its traceback."""
    log.error("unhandled error on %s %s", method, path, exc_info=exc)
    return problem_response(AppError("An internal error occurred; the request id identifies it in the logs."))


def install_problem_handlers(app: FastAPI) -> None:
    app.add_exception_handler(AppError, _on_app_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)
