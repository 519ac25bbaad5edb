"""Making and hashing API keys."""

from __future__ import annotations

import hashlib
import secrets

KEY_PREFIX = "pk_"
SHOWN_PREFIX_LENGTH = 10


def generate_key() -> str:
    # 32 random bytes: far beyond guessing, so a fast hash (not a password hash) is the right tool.
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def shown_prefix(key: str) -> str:
    return key[:SHOWN_PREFIX_LENGTH]
