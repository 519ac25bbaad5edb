"""Conversations: a task with a session_id gets the earlier turns that fit its context, and appends its own."""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack
from dataclasses import dataclass

from app.agent.events import SessionOutcome
from app.agent.runner import History, TaskSpec
from app.config import Settings
from app.sessions.base import Appended, SessionKey, SessionStore, encode_turn, turn_messages, turn_tokens
from app.sessions.memory import MemorySessionStore
from app.sessions.metrics import SessionMetrics

log = logging.getLogger(__name__)


class Conversations:
    """A turn is every message a task added after the system prompt: the query, each assistant message
    with tool calls and each tool result, the answer. Turns are kept whole, so a tool call is never
    sent without its results. Only a completed task appends its turn; a failed or cancelled one
    appends nothing, so a retry starts from the same history."""

    def __init__(self, store: SessionStore, settings: Settings) -> None:
        self.store = store
        self._settings = settings
        self._max_session_bytes = settings.sessions.max_session_bytes

    async def open(self, key_id: int, session_id: str, spec: TaskSpec) -> SessionTurn:
        """Hold the session for this task and give it the newest turns that fit its model's context.

        The room is the model's context_tokens less max_tokens and the prompt without history (the
        system prompt, context facts and query are never left out). Raises SessionBusy or
        SessionUnavailable; the spec's prompt_tokens then count the history too.
        """
        key = (key_id, session_id)
        turns = await self.store.begin(key, spec.id, spec.timeout_s)
        model = self._settings.models.get(spec.route.name)
        context = model.context_tokens if model is not None else 0
        prompt = spec.prompt_tokens or 0
        room = context - spec.max_tokens - prompt
        sent = used = 0
        for turn in reversed(turns):  # the newest first, and none older than one that does not fit
            tokens = turn_tokens(turn)
            if used + tokens > room:
                break
            used += tokens
            sent += 1
        kept = turns[len(turns) - sent :]
        messages = [message for turn in kept for message in turn_messages(turn)]
        spec.history = History(session_id, messages, turns=sent, left_out=len(turns) - sent)
        spec.prompt_tokens = prompt + used  # token counts add up message by message
        return SessionTurn(self, key, spec)

    async def finish(self, key: SessionKey, spec: TaskSpec) -> SessionOutcome:
        history = spec.history
        assert history is not None
        turn = encode_turn(spec.turn)
        if len(turn) > self._max_session_bytes:
            await self.store.release(key, spec.id)
            appended = Appended(False, "turn_too_large")
        else:
            appended = await self.store.finish(key, spec.id, turn)
        return SessionOutcome(
            id=key[1],
            history_turns=history.turns,
            turns_left_out=history.left_out,
            stored=appended.stored,
            reason=appended.reason,
        )


@dataclass(slots=True)
class SessionTurn:
    """A task's hold on its session: finished once (its turn appended) or released, however the task ends."""

    conversations: Conversations
    key: SessionKey
    spec: TaskSpec
    held: bool = True

    async def complete(self) -> SessionOutcome:
        """Append the completed task's turn (spec.turn) and release the session."""
        self.held = False
        return await self.conversations.finish(self.key, self.spec)

    async def release(self) -> None:
        """Free the session without a turn; never raises (the hold ends within the task's timeout anyway)."""
        if self.held:
            self.held = False
            try:
                await self.conversations.store.release(self.key, self.spec.id)
            except Exception:
                log.exception("session %s: could not release the hold of %s", self.key[1], self.spec.id)


async def start_conversations(
    stack: AsyncExitStack, settings: Settings, metrics: SessionMetrics
) -> Conversations | None:
    """The session store the settings ask for (Redis, shared, or in process), started and closed with `stack`."""
    sessions = settings.sessions
    if not sessions.enabled:
        return None
    url = sessions.redis_url or settings.limits.redis_url
    store: SessionStore
    if url is None:
        store = MemorySessionStore(sessions, metrics)
    else:
        from app.enforcement.redis_limiter import build_redis  # redis: only when configured
        from app.sessions.redis_store import RedisSessionStore

        store = RedisSessionStore(build_redis(url, timeout_s=sessions.redis_timeout_s), sessions, metrics)
    await store.start()
    stack.push_async_callback(store.aclose)
    log.info("sessions: %s", "Redis" if url is not None else "in process")
    return Conversations(store, settings)
