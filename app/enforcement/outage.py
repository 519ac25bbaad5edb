"""A shared backend's outage as one instance sees it: when to try it again, and one probe at a time.

Used by the key limiter's failure policy (resilient_limiter.py) and the edge limits (app/edge/): while
the backend is down, callers use their in-process fallback and only one of them at a time, after a
cool-down since the last failure, tries the backend again, instead of each waiting on a timeout.
"""

from __future__ import annotations

from collections.abc import Callable


class Outage:
    __slots__ = ("_clock", "_cooldown_s", "_probing", "_skip_until", "down")

    def __init__(self, clock: Callable[[], float], cooldown_s: float) -> None:
        self._clock = clock
        self._cooldown_s = cooldown_s
        self.down = False
        self._skip_until = 0.0
        self._probing = False

    def may_try(self) -> bool:
        """Whether this call should go to the backend: always while it is up, else as the one probe."""
        if not self.down:
            return True
        return not self._probing and self._clock() >= self._skip_until

    def start_probe(self) -> bool:
        """Mark a call to the backend as the probe if it is down; whether it is (for end_probe)."""
        probe = self.down
        if probe:
            self._probing = True
        return probe

    def end_probe(self, probe: bool) -> None:
        if probe:
            self._probing = False

    def failed(self) -> bool:
        """A call failed: the next try waits out the cool-down. True if this failure begins the outage."""
        self._skip_until = self._clock() + self._cooldown_s
        if self.down:
            return False
        self.down = True
        return True

    def answered(self) -> bool:
        """A call succeeded. True if this answer ends an outage."""
        if not self.down:
            return False
        self.down = False
        return True
