"""Request bodies and socket messages: parsed once, strictly, and only after the caller is authenticated.

One parser for every way in, so that what one route refuses no other route lets through: orjson
refuses invalid UTF-8, lone surrogates (which no JSON encoder can write back, in an error detail or
an audit row), NaN and numbers out of range, and the nesting is bounded here (a 300-deep `context`
once got past FastAPI's parser and broke orjson's 255-level encoder on the way out).
"""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request

from app.errors import Cancelled, InvalidRequest, MalformedJSON

M = TypeVar("M", bound=BaseModel)


def parse_json(raw: bytes | str, max_depth: int) -> Any:
    """The JSON value of `raw`, or MalformedJSON; InvalidRequest when nested deeper than `max_depth`."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if "depth limit" in str(exc):  # deeper than orjson's own 1,024 levels
            raise _too_deep(max_depth) from None
        raise MalformedJSON("The body is not valid JSON (UTF-8, no lone surrogates, numbers in range).") from None
    # Fewer brackets than the limit cannot nest past it: the usual body skips the walk entirely.
    brackets = raw.count(b"[") + raw.count(b"{") if isinstance(raw, bytes) else raw.count("[") + raw.count("{")
    if brackets > max_depth and _nesting(value, max_depth) > max_depth:
        raise _too_deep(max_depth)
    return value


def _too_deep(max_depth: int) -> InvalidRequest:
    return InvalidRequest(
        f"The JSON is nested more than {max_depth} levels deep.",
        extra={"errors": [{"loc": ["body"], "msg": f"nested deeper than {max_depth} levels", "type": "too_deep"}]},
    )


def validate(model: type[M], value: Any) -> M:
    """`value` as `model`, or InvalidRequest listing each problem with its location in the body."""
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise invalid_body(exc) from None


def invalid_body(exc: ValidationError) -> InvalidRequest:
    problems = [
        {"loc": ["body", *(str(part) for part in err["loc"])], "msg": err["msg"], "type": err["type"]}
        for err in exc.errors(include_url=False, include_context=False, include_input=False)
    ]
    summary = "; ".join(f"{'.'.join(p['loc'])}: {p['msg']}" for p in problems[:5])
    return InvalidRequest(summary or "The request body is invalid.", extra={"errors": problems})


def documented_body(model: type[BaseModel], example: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI requestBody of a route that reads `model` itself (FastAPI documents only bodies it
    parses); app/openapi.py adds the model's schema to the components. The example is a valid
    request, so that the docs' "Try it out" works as it comes."""
    reference = {"$ref": f"#/components/schemas/{model.__name__}"}
    content = {"application/json": {"schema": reference, "example": example}}
    return {"requestBody": {"required": True, "content": content}}


async def read_body(request: Request, model: type[M], max_depth: int) -> M:
    """The request's body as `model`. Call it after authentication: a caller without a key gets 401,
    whatever it sent."""
    return validate(model, parse_json(await read_raw(request), max_depth))


async def read_raw(request: Request) -> bytes:
    try:
        return await request.body()
    except ClientDisconnect:
        # The client left while sending: its row says cancelled, never a 500 with a traceback.
        raise Cancelled("The client went away while sending the request body.") from None


def _nesting(value: Any, limit: int) -> int:
    """How deep `value` nests (a scalar is 0), counted without recursion and no further than limit + 1."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > deepest:
            deepest = depth
            if deepest > limit:
                return deepest
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return deepest
