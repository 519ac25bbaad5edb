"""The Annotated dependencies routes share: resources and the authenticated caller."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.requests import HTTPConnection

from app.audit.context import audit_var
from app.auth.principal import Principal
from app.lifespan import Resources

# Declared through FastAPI's security classes so the OpenAPI schema documents both ways to send a key.
_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="The API key")


def get_resources(connection: HTTPConnection) -> Resources:
    resources: Resources = connection.state.resources
    return resources


ResourcesDep = Annotated[Resources, Depends(get_resources)]


async def require_principal(
    connection: HTTPConnection,
    resources: ResourcesDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    api_key: Annotated[str | None, Security(_api_key_header)],
) -> Principal:
    presented = bearer.credentials if bearer is not None else api_key
    principal = await resources.authenticator.authenticate(presented)
    connection.state.principal = principal
    audit = audit_var.get()
    if audit is not None:
        audit.api_key_id = principal.key_id
    return principal


PrincipalDep = Annotated[Principal, Depends(require_principal)]
