"""The OpenAPI schema, with the API key security schemes on every route that requires a key, and its docs pages."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from app.agent.schemas import TaskCreate
from app.docs import install_docs
from app.openai_compat.schemas import ChatCompletionRequest
from app.tools.router import ToolInvocation

# Every /v1 route takes an API key (a test checks each refuses a request without one); health,
# readiness and metrics do not.
SECURED_PREFIX = "/v1/"

# Request bodies that handlers read themselves, referenced from their routes' openapi_extra.
HANDLER_PARSED_BODIES: tuple[type[BaseModel], ...] = (ChatCompletionRequest, TaskCreate, ToolInvocation)

_JSON = "application/json"

SECURITY_SCHEMES = {
    "BearerAuth": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <API key>"},
    "ApiKeyAuth": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "The API key"},
}


def install_openapi(app: FastAPI, example_model: str) -> None:
    """`example_model`: a configured model name, for the request examples that name a model."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            components = schema.setdefault("components", {})
            components["securitySchemes"] = SECURITY_SCHEMES
            schemas = components.setdefault("schemas", {})
            for model in HANDLER_PARSED_BODIES:
                _add_model(schemas, model)
            for path, operations in schema.get("paths", {}).items():
                for operation in operations.values():
                    if path.startswith(SECURED_PREFIX):
                        operation["security"] = [{"BearerAuth": []}, {"ApiKeyAuth": []}]
                    content = operation.get("requestBody", {}).get("content", {})
                    example = content.get(_JSON, {}).get("example")
                    if isinstance(example, dict) and "model" in example:
                        # A copy: the route's own example is shared by every app built in this process.
                        content[_JSON] = {**content[_JSON], "example": {**example, "model": example_model}}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    install_docs(app)


def _add_model(schemas: dict[str, Any], model: type[BaseModel]) -> None:
    """Document a body a handler parses itself (FastAPI documents only bodies it parses)."""
    definition = model.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, nested in definition.pop("$defs", {}).items():
        schemas.setdefault(name, nested)
    schemas[model.__name__] = definition
