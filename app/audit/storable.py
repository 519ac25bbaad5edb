"""Makes every text value of an audit row storable, by rules read from the audit_record table itself."""

from __future__ import annotations

import re
import sys
from typing import Any

from sqlalchemy import String, TypeDecorator

from app.audit.models import AuditRecord

REPLACEMENT = "\ufffd"
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")  # NUL (PostgreSQL text refuses it) and lone surrogates (not UTF-8)


def _text_limits() -> tuple[tuple[str, int | None], ...]:
    """(column, max characters or None) for every text column of the table, in table order."""
    table = AuditRecord.__table__  # type: ignore[attr-defined]
    limits = []
    for column in table.columns:
        kind = column.type.impl_instance if isinstance(column.type, TypeDecorator) else column.type  # AutoString
        if isinstance(kind, String):
            limits.append((column.name, kind.length))
    return tuple(limits)


TEXT_LIMITS = _text_limits()
_LIMITS = tuple((name, sys.maxsize if limit is None else limit) for name, limit in TEXT_LIMITS)


def storable(row: dict[str, Any]) -> dict[str, Any]:
    """The row with each text value cleaned of NUL and lone surrogates (U+FFFD instead) and cut to its column."""
    for name, limit in _LIMITS:
        value = row.get(name)
        if value is None:
            continue
        # Fast path: an ASCII string can only hold a NUL, and `in` finds one with memchr.
        if type(value) is str and len(value) <= limit and value.isascii() and "\x00" not in value:
            continue
        if isinstance(value, str):
            row[name] = _UNSTORABLE.sub(REPLACEMENT, value)[:limit]
    return row
