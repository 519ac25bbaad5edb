"""Request bodies of the OpenAI chat-completions API, as far as Pacemaker reads them."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


def _check_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Checked here and passed on as the very dicts that came in: a model per message, dumped back
    # to a dict for the upstream, cost more than the rest of the route's own work.
    for index, message in enumerate(messages):
        if message.get("role") not in ROLES:
            raise ValueError(f"messages[{index}].role must be one of {', '.join(sorted(ROLES))}")
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise ValueError(f"messages[{index}].content must be a string, a list of parts, or null")
    return messages


ChatMessages = Annotated[
    list[dict[str, Any]],
    Field(min_length=1, description="OpenAI chat messages: {role, content, name?, tool_calls?, tool_call_id?}"),
    AfterValidator(_check_messages),
]


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    # Parameters not listed here (top_p, stop, seed, response_format, ...) go to the upstream as sent.
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    messages: ChatMessages
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    n: int | None = Field(None, ge=1, le=1, description="Only one choice is supported.")
