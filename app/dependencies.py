"""The Annotated dependencies routes share: resources and the authenticated caller."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from starlette.requests import HTTPConnection

from app.audit.context import AuditContext
from app.auth.authenticator import key_from_headers
from app.auth.principal import Principal
from app.resources import Resources


# Both are async on purpose: FastAPI runs a plain `def` dependency in a thread pool, a hop that
# cost 5-9% of a request's CPU in the benchmark.
async def get_resources(connection: HTTPConnection) -> Resources:
    resources: Resources = connection.state.resources
    return resources


ResourcesDep = Annotated[Resources, Depends(get_resources)]


async def require_principal(connection: HTTPConnection, resources: ResourcesDep) -> Principal:
    """The caller, from `Authorization: Bearer <key>` or `X-API-Key` (documented in the OpenAPI schema
    by app/openapi.py rather than by FastAPI's security classes, which cost a dependency each)."""
    return await authenticate(connection, resources)


async def authenticate(connection: HTTPConnection, resources: Resources) -> Principal:
    """require_principal as a plain call, for the hottest route, which skips dependency solving."""
    headers = connection.headers
    presented = key_from_headers(headers.get("authorization"), headers.get("x-api-key"))
    client = connection.scope.get("client")  # the address uvicorn resolved: the edge keys on it too (app/edge/)
    principal = await resources.authenticator.authenticate(presented, client=client[0] if client else None)
    connection.state.principal = principal
    audit: AuditContext | None = getattr(connection.state, "audit", None)  # HTTP requests have one
    if audit is not None:
        audit.api_key_id = principal.key_id
    return principal


PrincipalDep = Annotated[Principal, Depends(require_principal)]
