"""Redis' errors for `except` clauses, without importing redis (8 MB of modules) where it is not configured.

Code that may talk to Redis or not catches `redis_errors(OSError)`: before any client exists
the redis package is not imported, and nothing can raise its errors, so there is nothing to catch.
An `except` clause evaluates its tuple only when an exception is on its way, never on the happy path.
"""

from __future__ import annotations

import sys


def redis_errors(*others: type[BaseException]) -> tuple[type[BaseException], ...]:
    """`others` and, once redis is imported, redis.exceptions.RedisError."""
    module = sys.modules.get("redis.exceptions")
    return others if module is None else (module.RedisError, *others)


def backend_errors() -> tuple[type[BaseException], ...]:
    """What "the shared backend is down" looks like (app.enforcement.resilient_limiter.BACKEND_ERRORS)."""
    return redis_errors(ConnectionError, TimeoutError, OSError)
