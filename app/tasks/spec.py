"""Turns a validated task request into what the runner needs, refusing what cannot run."""

from __future__ import annotations

import functools

from app.agent.runner import TaskSpec, initial_messages
from app.agent.schemas import TaskCreate
from app.agent.tiers import choose_model
from app.auth.principal import Principal
from app.config import Settings
from app.errors import InvalidRequest, ToolNotAllowed
from app.ids import new_id
from app.providers.registry import ProviderRegistry
from app.providers.tokens import count_message_tokens
from app.tools.base import ToolContext
from app.tools.registry import ToolRegistry


def new_task_id() -> str:
    return "task_" + new_id()


def build_task_spec(
    body: TaskCreate,
    *,
    settings: Settings,
    providers: ProviderRegistry,
    tools: ToolRegistry,
    stream: bool,
    principal: Principal,
) -> TaskSpec:
    model, tier = choose_model(
        settings.tiers, mode=body.mode, model=body.model, model_tier=body.model_tier, context=body.context
    )
    route = providers.route(model)
    allowed = tools.allowed_for(principal)
    if body.tools is not None:
        unknown = sorted(set(body.tools) - set(tools.names()))
        if unknown:
            raise InvalidRequest(f"Unknown tools: {', '.join(unknown)}. Available: {', '.join(tools.names())}.")
        refused = sorted(set(body.tools) - set(allowed))
        if refused:
            raise ToolNotAllowed(f"This key may not use: {', '.join(refused)}.")
    agent = settings.agent
    max_tokens = body.max_tokens or agent.default_max_tokens
    if max_tokens > agent.max_tokens_ceiling:
        raise InvalidRequest(f"max_tokens may be at most {agent.max_tokens_ceiling}.")
    spec = TaskSpec(
        id=new_task_id(),
        query=body.query,
        route=route,
        tier=tier,
        # The model is offered only what both the key and the task allow.
        tools=tools.select(allowed if body.tools is None else body.tools),
        system_prompt=agent.system_prompt,
        max_tokens=max_tokens,
        max_iterations=agent.max_iterations,
        timeout_s=body.timeout_s or agent.default_timeout_s,
        stream=stream,
        temperature=body.temperature,
        context=body.context,
        tool_context=ToolContext(principal.key_id, body.session_id, principal.sandbox_max),
        max_parallel_tools=agent.max_parallel_tools,
    )
    # The system prompt leads every task's messages and is the same for all: counted once (7 us a count).
    spec.prompt_tokens = _system_tokens(spec.system_prompt) + count_message_tokens(initial_messages(spec)[1:])
    return spec


@functools.lru_cache(maxsize=16)
def _system_tokens(system_prompt: str) -> int:
    return count_message_tokens([{"role": "system", "content": system_prompt}])
