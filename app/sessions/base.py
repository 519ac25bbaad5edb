"""What both session stores share: the stored turn's format, the values they return, the protocol and errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import orjson

from app.errors import AppError
from app.providers.base import Message
from app.providers.tokens import count_message_tokens

# A session is one API key's: the same session_id under two keys is two sessions.
SessionKey = tuple[int, str]  # (api key id, session_id)
NotStored = Literal["turn_too_large", "store_unavailable", "hold_expired"]


def encode_turn(messages: list[Message]) -> bytes:
    """A turn as stored: its estimated tokens, a newline, its messages as JSON.

    The tokens come first so that a store (Lua included) reads them without parsing the JSON. The
    concatenation is a new object of exactly its length (an orjson result keeps a 4 KiB buffer).
    """
    return b"%d\n" % count_message_tokens(messages) + orjson.dumps(messages)


def turn_tokens(turn: bytes) -> int:
    return int(turn[: turn.index(b"\n")])


def turn_messages(turn: bytes) -> list[Message]:
    messages: list[Message] = orjson.loads(memoryview(turn)[turn.index(b"\n") + 1 :])
    return messages


@dataclass(frozen=True, slots=True)
class SessionInfo:
    id: str
    turns: int
    tokens: int
    bytes: int
    created_at: float  # Unix seconds
    last_used_at: float


@dataclass(frozen=True, slots=True)
class SessionPage:
    sessions: list[SessionInfo]
    next_after: str | None  # the id to list after for the next page; None on the last page


@dataclass(frozen=True, slots=True)
class Appended:
    """What became of a finished turn: stored (and how many old turns made room for it), or why not."""

    stored: bool
    reason: NotStored | None = None
    trimmed: int = 0


class SessionBusy(AppError):
    """Another turn of the session is running: turns never interleave."""

    status, code, title, retryable = 409, "session_busy", "A turn of this session is running", True
    capacity_refusal = True


class SessionNotFound(AppError):
    # Also another key's session: a 403 would confirm that it exists.
    status, code, title = 404, "session_not_found", "No such session"


class SessionUnavailable(AppError):
    status, code, title, retryable = 503, "session_unavailable", "Sessions cannot be read right now", True


class SessionStore(Protocol):
    """Conversations by (key id, session id): turns appended whole, one turn at a time per session."""

    async def begin(self, key: SessionKey, task_id: str, hold_s: float) -> list[bytes]:
        """Mark the session busy for `task_id` (for at most hold_s) and return its turns, oldest first.

        Raises SessionBusy (another task holds it) or SessionUnavailable. Counts as a use (TTL, LRU).
        """
        ...

    async def finish(self, key: SessionKey, task_id: str, turn: bytes) -> Appended:
        """Append the turn of `task_id` and release the session; refused if another task holds it now."""
        ...

    async def release(self, key: SessionKey, task_id: str) -> None:
        """Release the session if `task_id` still holds it (a turn that appends nothing)."""
        ...

    async def read(self, key: SessionKey) -> tuple[SessionInfo, list[bytes]] | None:
        """The session and its turns, oldest first, without counting as a use; None if there is none."""
        ...

    async def page(self, key_id: int, after: str | None, limit: int) -> SessionPage:
        """The key's sessions by id, after `after`."""
        ...

    async def delete(self, key: SessionKey) -> bool:
        """Forget the session (SessionBusy while a turn runs); whether it existed."""
        ...

    async def start(self) -> None: ...

    async def check(self) -> str | None:
        """Whether the store answers (a readiness check): None when there is nothing to check (in process)."""
        ...

    async def aclose(self) -> None: ...
