"""Per-task append-only event logs that clients follow and resume: in memory, or in Redis Streams.

The Redis ones (and redis itself) are imported when first asked for: only where Redis is configured.
"""

from typing import TYPE_CHECKING, Any

from app.tasks.events.base import (
    TERMINAL_TYPES,
    EventLog,
    EventReader,
    EventsGone,
    EventWriter,
    LoggedEvent,
    UnknownTask,
)
from app.tasks.events.memory import MemoryEventLog, MemoryEventWriter
from app.tasks.events.settings import EventsSettings

if TYPE_CHECKING:
    from app.tasks.events.redis_streams import RedisEventLog, RedisEventWriter, build_reader_redis

_REDIS = {"RedisEventLog", "RedisEventWriter", "build_reader_redis"}


def __getattr__(name: str) -> Any:
    if name in _REDIS:
        from app.tasks.events import redis_streams

        return getattr(redis_streams, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "TERMINAL_TYPES",
    "EventLog",
    "EventReader",
    "EventWriter",
    "EventsGone",
    "EventsSettings",
    "LoggedEvent",
    "MemoryEventLog",
    "MemoryEventWriter",
    "RedisEventLog",
    "RedisEventWriter",
    "UnknownTask",
    "build_reader_redis",
]
