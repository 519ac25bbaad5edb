"""Per-task append-only event logs that clients follow and resume: in memory, or in Redis Streams."""

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
from app.tasks.events.redis_streams import RedisEventLog, RedisEventWriter, build_reader_redis
from app.tasks.events.settings import EventsSettings

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
