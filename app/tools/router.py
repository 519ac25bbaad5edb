"""GET /v1/tools and POST /v1/tools/{name}/invoke: the registry, and tools called directly by clients."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Path, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from app.agent.schemas import SessionId
from app.audit.context import AuditContext
from app.dependencies import PrincipalDep, ResourcesDep
from app.errors import InvalidRequest, NotFound, ToolNotAllowed
from app.problems import problem_responses
from app.request_body import documented_body, read_body
from app.tools.base import ToolContext, ToolError

router = APIRouter(prefix="/v1/tools", tags=["tools"])


class ToolOut(BaseModel):
    name: str
    description: str
    parameters: dict[str, Any] = Field(description="JSON Schema of the arguments")


class ToolInvocation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    arguments: dict[str, Any] = Field(default_factory=dict)
    session_id: SessionId | None = Field(None, description="Names a workspace kept between sandboxed runs.")


class ToolInvocationResult(BaseModel):
    tool: str
    result: Any = None
    error: str | None = None
    duration_ms: float


@router.get(
    "", response_model=list[ToolOut], summary="List the tools you may use", responses=problem_responses(401, 503)
)
async def list_tools(principal: PrincipalDep, resources: ResourcesDep) -> list[ToolOut]:
    return [
        ToolOut(name=tool.name, description=tool.description, parameters=tool.parameters)
        for tool in resources.tools.select(resources.tools.allowed_for(principal))
    ]


@router.post(
    "/{name}/invoke",
    response_model=ToolInvocationResult,
    summary="Call a tool directly",
    responses=problem_responses(400, 401, 403, 404, 413, 422, 429, 503),
    openapi_extra=documented_body(ToolInvocation, {"arguments": {"expression": "17 * 23 + 4"}}),
)
async def invoke_tool(
    name: Annotated[str, Path(description="The tool's name", examples=["calculator"])],
    request: Request,
    principal: PrincipalDep,
    resources: ResourcesDep,
) -> Response:
    tool = resources.tools.get(name)
    if tool is None:
        raise NotFound(f"No tool named {name!r}. Available: {', '.join(resources.tools.names())}.")
    if name not in resources.tools.allowed_for(principal):
        raise ToolNotAllowed(f"This key may not use {name!r}.")
    body = await read_body(request, ToolInvocation, resources.settings.server.max_json_depth)
    try:
        arguments = tool.parse_arguments(body.arguments)
    except ToolError as exc:
        raise InvalidRequest(str(exc)) from None
    audit: AuditContext = request.state.audit
    ticket = await resources.enforcer.admit(
        principal, route=None, prompt_tokens=0, max_tokens=0, scope=request.scope, audit=audit
    )
    context = ToolContext(principal.key_id, body.session_id, principal.sandbox_max)
    try:
        outcome = await resources.tool_invoker.call(tool, arguments, context, audit=audit)
    finally:
        await ticket.close()
    if outcome.refusal is not None:
        raise outcome.refusal  # the breaker is open, or the tool has no room now: 503 with Retry-After
    if outcome.error is not None:
        audit.status, audit.error_code = "failed", "tool_error"
    result = ToolInvocationResult(
        tool=name, result=outcome.result, error=outcome.error, duration_ms=outcome.duration_ms
    )
    return Response(orjson.dumps(result.model_dump(mode="json")), media_type="application/json")
