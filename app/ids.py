"""Random ids for requests, completions, audit rows and tasks: 128 bits, as hex, without a syscall each.

`secrets.token_hex(16)` makes one getrandom syscall per id, which was 10 % of the event loop's time
on the chat route (four ids per request). The bytes here come from the same source (os.urandom),
fetched 4 KiB at a time and handed out 16 bytes per id, so the ids stay as unpredictable as before
(a task id is a capability of sorts: it is not guessable from another). Each id is handed out once
by a list iterator (one step of C code, so also safe across threads); a forked child drops the
ids it inherited, so no two processes hand out the same ones.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

_ID_BYTES = 16
_PER_BATCH = 256

_batch: Iterator[str] = iter(())


def new_id() -> str:
    """32 lowercase hex characters (128 random bits), like secrets.token_hex(16)."""
    global _batch
    try:
        return next(_batch)
    except StopIteration:
        text = os.urandom(_ID_BYTES * _PER_BATCH).hex()
        width = 2 * _ID_BYTES
        _batch = iter([text[i : i + width] for i in range(0, len(text), width)])
        return next(_batch)


def _forget_inherited() -> None:
    global _batch
    _batch = iter(())


os.register_at_fork(after_in_child=_forget_inherited)
