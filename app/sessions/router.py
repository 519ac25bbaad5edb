"""The /v1/sessions routes: the caller's conversations, one conversation's messages, and forgetting one."""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel, Field
from starlette.responses import Response

from app.agent.schemas import SESSION_ID_MAX, SESSION_ID_PATTERN
from app.dependencies import PrincipalDep, ResourcesDep
from app.errors import InvalidRequest
from app.problems import problem_responses
from app.resources import Resources
from app.sandbox.workspace import remove_tree
from app.sessions.base import SessionInfo, SessionKey, SessionNotFound, turn_messages
from app.tools.python import workspace_name

router = APIRouter(prefix="/v1", tags=["sessions"])

SessionPath = Annotated[
    str,
    Path(min_length=1, max_length=SESSION_ID_MAX, pattern=SESSION_ID_PATTERN, description="The session_id"),
]
_SESSION_ID = re.compile(SESSION_ID_PATTERN)


class SessionSummary(BaseModel):
    id: str = Field(description="The session_id")
    turns: int = Field(description="Turns kept (a completed task is one turn)")
    tokens: int = Field(description="Estimated tokens of the turns kept")
    bytes: int = Field(description="Stored bytes of the turns kept")
    created_at: datetime
    last_used_at: datetime = Field(description="The last task of the session; it expires sessions.ttl_s after")


class SessionList(BaseModel):
    data: list[SessionSummary] = Field(description="By id; a page may hold fewer than `limit`")
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page")


class SessionDetail(SessionSummary):
    messages: list[dict[str, Any]] = Field(
        description="Every turn's messages, oldest first, as the model is sent them: the user's query, "
        "assistant messages with tool_calls, tool results, the answer"
    )


@router.get(
    "/sessions",
    response_model=SessionList,
    summary="Your sessions (conversations), by id",
    responses=problem_responses(401, 422, 503),
)
async def list_sessions(
    principal: PrincipalDep,
    resources: ResourcesDep,
    cursor: Annotated[str | None, Query(max_length=200, description="The next_cursor of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=500, description="Sessions per page")] = 100,
) -> SessionList:
    conversations = resources.tasks.sessions
    if conversations is None:
        return SessionList(data=[], next_cursor=None)
    page = await conversations.store.page(principal.key_id, _after(cursor), limit)
    return SessionList(
        data=[_summary(info) for info in page.sessions],
        next_cursor=None if page.next_after is None else base64.urlsafe_b64encode(page.next_after.encode()).decode(),
    )


@router.get(
    "/sessions/{session_id}",
    response_model=SessionDetail,
    summary="A session and its messages",
    responses=problem_responses(401, 404, 422, 503),
)
async def get_session(session_id: SessionPath, principal: PrincipalDep, resources: ResourcesDep) -> SessionDetail:
    conversations = resources.tasks.sessions
    found = None if conversations is None else await conversations.store.read((principal.key_id, session_id))
    if found is None:
        raise SessionNotFound(f"No session {session_id!r} for this key.")
    info, turns = found
    messages = [message for turn in turns for message in turn_messages(turn)]
    return SessionDetail(**_summary(info).model_dump(), messages=messages)


@router.delete(
    "/sessions/{session_id}",
    status_code=204,
    response_class=Response,
    summary="Forget a session: its conversation and its sandbox workspace",
    responses={204: {"description": "Forgotten"}, **problem_responses(401, 404, 409, 422, 503)},
)
async def delete_session(session_id: SessionPath, principal: PrincipalDep, resources: ResourcesDep) -> Response:
    key: SessionKey = (principal.key_id, session_id)
    conversations = resources.tasks.sessions
    # The conversation first: while a turn runs it refuses (409), and the workspace stays with it.
    forgotten = conversations is not None and await conversations.store.delete(key)
    removed = await asyncio.to_thread(_remove_workspace, resources, key)
    if not (forgotten or removed):
        raise SessionNotFound(f"No session {session_id!r} for this key.")
    return Response(status_code=204)


def _remove_workspace(resources: Resources, key: SessionKey) -> bool:
    """Remove the session's /workspace if it has one (never following a link out); whether it did."""
    root = resources.settings.sandbox.sessions_dir.resolve()
    path = root / workspace_name(key[0], key[1])
    if path.is_symlink() or not path.is_dir():
        return False
    try:
        remove_tree(path)
    except FileNotFoundError:
        return False
    return True


def _after(cursor: str | None) -> str | None:
    if cursor is None or cursor == "":
        return None
    try:
        after = base64.urlsafe_b64decode(cursor.encode()).decode()
    except (binascii.Error, UnicodeError, ValueError):
        after = ""
    if not (0 < len(after) <= SESSION_ID_MAX and _SESSION_ID.fullmatch(after)):
        raise InvalidRequest("cursor is not a next_cursor this API returned.")
    return after


def _summary(info: SessionInfo) -> SessionSummary:
    return SessionSummary(
        id=info.id,
        turns=info.turns,
        tokens=info.tokens,
        bytes=info.bytes,
        created_at=datetime.fromtimestamp(info.created_at, UTC),
        last_used_at=datetime.fromtimestamp(info.last_used_at, UTC),
    )
