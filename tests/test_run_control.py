"""RunControl: one timer per run ends the await in progress at the deadline or on cancel(), and tells its
own interruption from any other cancellation of the task that awaits."""

from __future__ import annotations

import asyncio
import warnings

import pytest

from app.agent.control import RunControl
from app.errors import AppError, Cancelled, Overloaded


async def _value_after(seconds: float, value: str = "done") -> str:
    await asyncio.sleep(seconds)
    return value


async def test_an_await_before_the_deadline_returns_its_value() -> None:
    control = RunControl(5.0)
    control.start()
    assert await control.within(_value_after(0.01)) == "done"
    assert await control.within(_value_after(0)) == "done"
    control.stop()


async def test_the_deadline_ends_the_await_in_progress_and_every_later_one() -> None:
    control = RunControl(0.05)
    control.start()
    with pytest.raises(TimeoutError):
        await control.within(_value_after(10))
    assert control.expired
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the coroutine it will never await is closed, not left to warn
        with pytest.raises(TimeoutError):
            await control.within(_value_after(0))
    await asyncio.sleep(0)  # the task is left with no cancellation pending
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_cancel_from_another_task_ends_the_await_with_the_reason() -> None:
    for reason, expected in ((None, Cancelled), (Overloaded("draining"), Overloaded)):
        control = RunControl(30.0)
        control.start()
        asyncio.get_running_loop().call_later(0.02, control.cancel, reason)
        with pytest.raises(expected):
            await control.within(_value_after(10))
        with pytest.raises(expected):  # and every later await, at once
            await control.within(_value_after(0))
        assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
        control.stop()


async def test_a_cancellation_not_its_own_goes_through_unchanged() -> None:
    control = RunControl(30.0)
    control.start()
    waiter = asyncio.create_task(control.within(_value_after(10)))
    await asyncio.sleep(0.01)
    waiter.cancel()  # a client gone, a shutdown: not the deadline, not cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert not control.cancelled and not control.expired
    assert await control.within(_value_after(0)) == "done"  # the control itself is unharmed
    control.stop()


async def test_both_at_once_the_outside_cancellation_wins() -> None:
    control = RunControl(30.0)
    control.start()
    waiter = asyncio.create_task(control.within(_value_after(10)))
    await asyncio.sleep(0.01)
    control.cancel()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    control.stop()


async def test_cancel_from_inside_the_await_ends_it_at_its_next_wait() -> None:
    control = RunControl(30.0)
    control.start()

    async def cancels_itself() -> str:
        control.cancel()  # from the very task that awaits
        await asyncio.sleep(10)
        return "never"

    with pytest.raises(Cancelled):
        await control.within(cancels_itself())
    await asyncio.sleep(0)  # nothing is left pending on this task
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
    control.stop()


async def test_cancel_from_inside_an_await_that_then_returns_leaves_the_task_clean() -> None:
    control = RunControl(30.0)
    control.start()

    async def cancels_and_returns() -> str:
        control.cancel()
        return "value"

    assert await control.within(cancels_and_returns()) == "value"
    await asyncio.sleep(0.01)  # no cancellation was left armed on this task for its next wait
    with pytest.raises(Cancelled):
        await control.within(_value_after(0))
    control.stop()


async def test_an_await_that_swallows_the_interruption_leaves_the_task_clean() -> None:
    control = RunControl(0.02)
    control.start()

    async def stubborn() -> str:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            return "swallowed"
        return "slept"

    assert await control.within(stubborn()) == "swallowed"
    await asyncio.sleep(0.01)  # the task can wait again: no cancellation carried over
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
    with pytest.raises(TimeoutError):
        await control.within(_value_after(0))


async def test_stop_disarms_the_timer() -> None:
    control = RunControl(0.02)
    control.start()
    control.stop()
    await asyncio.sleep(0.05)
    assert not control.expired
    control.stop()  # twice is fine


async def test_cancel_before_start_and_after_the_end_is_safe() -> None:
    control = RunControl(1.0)
    control.cancel(AppError("before"))
    control.start()
    with pytest.raises(AppError, match="before"):
        await control.within(_value_after(0))
    control.stop()
    control.cancel()  # after the end: nothing to interrupt
