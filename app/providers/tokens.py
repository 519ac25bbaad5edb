"""Token estimates for when an upstream reports no usage, and for the simulated provider.

No tokenizer files are downloaded at run time; this approximates BPE counts (about one token per
short word or punctuation mark, more for long words) and is always flagged as an estimate.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

_PIECE = re.compile(r"\w+|[^\w\s]")
MESSAGE_OVERHEAD_TOKENS = 4


def count_text_tokens(text: str) -> int:
    return sum(1 + len(piece) // 6 for piece in _PIECE.findall(text))


def count_message_tokens(messages: Iterable[dict[str, Any]]) -> int:
    total = 0
    for message in messages:
        total += MESSAGE_OVERHEAD_TOKENS
        content = message.get("content")
        if isinstance(content, str):
            total += count_text_tokens(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    total += count_text_tokens(part["text"])
        for call in message.get("tool_calls") or ():
            function = call.get("function") or {}
            total += count_text_tokens(str(function.get("name", ""))) + count_text_tokens(
                str(function.get("arguments", ""))
            )
    return total
