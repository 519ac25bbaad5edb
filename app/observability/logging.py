"""Logging: one line per record, with the request id and no credentials; JSON lines when log_json is set."""

from __future__ import annotations

import logging
import re
import sys
import time
from urllib.parse import unquote_plus

from app import json_text
from app.config import Settings
from app.middleware import request_id_var
from app.observability import tracing

# Query parameters whose value is a credential: compared case-insensitively, after percent-decoding,
# since that is how the app reads them (`?API%5FKEY=` is `api_key` to it).
SECRET_PARAMETERS = frozenset({"api_key", "key", "token", "access_token"})
REDACTED = "[redacted]"

# `name=` where a query parameter can start: at the start, or after ? & ; a space or a quote.
_PARAMETER = re.compile(r"""(?<![^?&;\s"'])([^=&;\s"'?]+)=""")
# A value runs to the next & (not ;, which some parsers split on and the app does not), space or quote.
_VALUE_END = re.compile(r"""[&\s"']""")
# A key wherever it is (pasted in a path, say): pk_ and 43 URL-safe characters, maybe percent-encoded.
_KEY = re.compile(r"pk(?:_|%5[Ff])(?:[A-Za-z0-9_-]|%[0-9A-Fa-f]{2}){32,}")
# Credential headers as the WebSocket library prints a handshake at DEBUG ("< authorization: Bearer ...").
_HEADER = re.compile(r"(?i)(?<![\w-])(authorization|proxy-authorization|x-api-key|cookie):[ \t]*[^\r\n]+")
_EXCEPTIONS = logging.Formatter()


def redact(text: str) -> str:
    """The text with every key, credential query value and credential header value replaced."""
    if "=" in text:
        text = _redact_parameters(text)
    if "pk" in text:
        text = _KEY.sub("pk_" + REDACTED, text)
    if ":" in text:  # nearly always (addresses, times): look for the header names before the regex
        lowered = text.lower()
        if "authorization:" in lowered or "x-api-key:" in lowered or "cookie:" in lowered:
            text = _HEADER.sub(r"\1: " + REDACTED, text)
    return text


def _redact_parameters(text: str) -> str:
    parts: list[str] = []
    done = 0
    for match in _PARAMETER.finditer(text):
        if match.start() < done:
            continue  # a name=... inside a value already redacted
        name = match.group(1)
        if "%" in name or "+" in name:
            name = unquote_plus(name)
        if name.lower() not in SECRET_PARAMETERS:
            continue
        start = match.end()
        end = _VALUE_END.search(text, start)
        stop = end.start() if end else len(text)
        if stop > start:
            parts += (text[done:start], REDACTED)
            done = stop
    if not parts:
        return text
    parts.append(text[done:])
    return "".join(parts)


class RedactingFilter(logging.Filter):
    """Rewrites a record's message, arguments and exception text so that no credential is printed.

    A handler filter, so it runs only for records that are emitted, on every logger the handler
    serves. Arguments keep their shape where they can (uvicorn's access formatter unpacks them).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed call: logging prints its msg and args as they are, so clean them
            record.msg = redact(str(record.msg))
            if isinstance(record.args, tuple):
                record.args = tuple(redact(arg if isinstance(arg, str) else repr(arg)) for arg in record.args)
            elif record.args:
                record.args = (redact(repr(record.args)),)
        else:
            clean = redact(message)
            if clean != message:
                _rewrite(record, clean)
        if record.exc_info and not record.exc_text:
            # Formatters reuse exc_text once it is set, so the redacted text is what they print.
            record.exc_text = _EXCEPTIONS.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        request_id = record.__dict__.get("request_id")
        if isinstance(request_id, str) and "pk" in request_id:  # ids are the client's own when well-formed
            record.request_id = redact(request_id)
        return True


def _rewrite(record: logging.LogRecord, clean: str) -> None:
    args = record.args
    if isinstance(record.msg, str) and isinstance(args, tuple) and args:
        msg = redact(record.msg)
        redacted = tuple(redact(arg) if isinstance(arg, str) else arg for arg in args)
        try:
            kept = msg % redacted == clean
        except (TypeError, ValueError, KeyError):
            kept = False
        if kept:
            record.msg, record.args = msg, redacted
            color = record.__dict__.get("color_message")  # uvicorn's coloured variant of msg
            if isinstance(color, str):
                record.color_message = redact(color)
            return
    record.msg, record.args = clean, ()
    if "color_message" in record.__dict__:
        record.color_message = clean


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get() or "-"
        return True


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        if tracing.TRACER is not None:
            trace_id = tracing.current_trace_id()
            if trace_id is not None:
                entry["trace_id"] = trace_id
        if record.exc_info:
            entry["exception"] = record.exc_text or self.formatException(record.exc_info)
        return json_text.dumps(entry).decode()


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    handler.addFilter(RedactingFilter())  # after the request id, which it checks too
    if settings.log_json:
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    app_logger = logging.getLogger("app")
    app_logger.handlers[:] = [handler]
    app_logger.setLevel(settings.log_level)
    app_logger.propagate = False
