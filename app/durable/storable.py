"""Makes every text value of a row storable by rules read from its table: no NUL, no lone surrogate, no overflow."""

from __future__ import annotations

import math
import re
import sys
from typing import Any

from sqlalchemy import JSON, String, Table, TypeDecorator

REPLACEMENT = "\ufffd"
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")  # NUL (PostgreSQL text refuses it) and lone surrogates (not UTF-8)


def _clean(text: str) -> str:
    # An ASCII string can only hold a NUL, and `in` finds one with memchr: 0.03 us against the regex's 0.2.
    if text.isascii() and "\x00" not in text:
        return text
    return _UNSTORABLE.sub(REPLACEMENT, text)


def _clean_json(value: Any) -> Any:
    """A JSON value with its strings (keys too) cleaned, and non-finite floats as null (as the journal writes them)."""
    if isinstance(value, str):
        return _clean(value)
    if isinstance(value, dict):
        # None, the commonest value of a request's optional fields, is passed over without a call.
        return {
            _clean(key) if isinstance(key, str) else key: item if item is None else _clean_json(item)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [_clean_json(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Storable:
    """Cleans a table's rows in place: text columns cut to their length, JSON columns' strings cleaned throughout."""

    def __init__(self, table: Table) -> None:
        limits: list[tuple[str, int | None]] = []
        json: list[str] = []
        for column in table.columns:
            kind = column.type.impl_instance if isinstance(column.type, TypeDecorator) else column.type  # AutoString
            if isinstance(kind, String):
                limits.append((column.name, kind.length))
            elif isinstance(kind, JSON):
                json.append(column.name)
        self.text_limits = tuple(limits)  # (column, max characters or None), in table order
        self._limits = tuple((name, sys.maxsize if limit is None else limit) for name, limit in limits)
        self._json = tuple(json)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        for name, limit in self._limits:
            value = row.get(name)
            # _clean's test inlined: a row has a dozen text columns, nearly always storable as they are.
            if isinstance(value, str) and not (value.isascii() and "\x00" not in value and len(value) <= limit):
                row[name] = _clean(value)[:limit]
        for name in self._json:
            if row.get(name) is not None:
                row[name] = _clean_json(row[name])
        return row
