"""The in-process limiter: buckets, reservations, budget periods, seeding and bounded state, on fake clocks."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from app.enforcement.limits import Admission, LimitSpec, Period, PeriodSpend, Reservation, nanos_to_usd, usd_to_nanos
from app.enforcement.memory_limiter import MemoryLimiter


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def wall_at(iso: str) -> FakeClock:
    return FakeClock(datetime.fromisoformat(iso).replace(tzinfo=UTC).timestamp())


def limiter(**kwargs: object) -> tuple[MemoryLimiter, FakeClock, FakeClock]:
    clock, wall = FakeClock(1000.0), wall_at("2025-03-15T12:00:00")
    return MemoryLimiter(clock=clock, wall_clock=wall, **kwargs), clock, wall  # type: ignore[arg-type]


ZERO = Decimal(0)


async def seed(limits: MemoryLimiter, key_id: int, spec: LimitSpec, spent: Decimal = ZERO) -> None:
    """Seed a budget as the Enforcer does: the limiter names the period it lacks, which is then seeded."""
    asked = await limits.admit(key_id, spec, tokens=0, cost_usd=ZERO)
    assert asked.reason == "seed" and asked.period is not None and not asked.allowed
    await limits.seed(key_id, spec, PeriodSpend(asked.period, spent))


def taken(admission: Admission) -> Reservation:
    assert admission.reservation is not None, admission
    return admission.reservation


async def test_burst_is_admitted_at_once_then_the_next_request_is_refused_for_rpm() -> None:
    limits, _, _ = limiter()
    spec = LimitSpec(rpm=60, burst=5)
    answers = [await limits.admit(1, spec, tokens=0, cost_usd=ZERO) for _ in range(6)]
    assert [a.allowed for a in answers] == [True] * 5 + [False]
    refused = answers[-1]
    assert refused.reason == "rpm"
    assert refused.retry_after_s == pytest.approx(1.0)
    assert refused.requests is not None
    assert (refused.requests.limit, refused.requests.remaining) == (5, 0)
    assert refused.requests.reset_s == pytest.approx(5.0)


async def test_retry_after_is_exactly_the_refill_time_and_waiting_it_is_enough() -> None:
    limits, clock, _ = limiter()
    spec = LimitSpec(rpm=120, burst=2)  # two per second
    for _ in range(2):
        assert (await limits.admit(1, spec, tokens=0, cost_usd=ZERO)).allowed
    first = await limits.admit(1, spec, tokens=0, cost_usd=ZERO)
    assert first.retry_after_s == pytest.approx(0.5)
    clock.advance(0.2)
    second = await limits.admit(1, spec, tokens=0, cost_usd=ZERO)
    assert not second.allowed and second.retry_after_s == pytest.approx(0.3)
    assert second.retry_after_s is not None
    clock.advance(second.retry_after_s)
    assert (await limits.admit(1, spec, tokens=0, cost_usd=ZERO)).allowed


async def test_burst_defaults_to_rpm() -> None:
    limits, _, _ = limiter()
    spec = LimitSpec(rpm=3)
    answers = [await limits.admit(1, spec, tokens=0, cost_usd=ZERO) for _ in range(4)]
    assert [a.allowed for a in answers] == [True, True, True, False]
    assert answers[0].requests is not None and answers[0].requests.limit == 3


async def test_settle_gives_unused_tokens_back_to_the_tpm_bucket() -> None:
    limits, _, _ = limiter()
    spec = LimitSpec(tpm=600)  # ten tokens per second
    admitted = await limits.admit(1, spec, tokens=500, cost_usd=ZERO)
    assert admitted.tokens is not None and admitted.tokens.remaining == 100
    refused = await limits.admit(1, spec, tokens=200, cost_usd=ZERO)
    assert refused.reason == "tpm" and refused.retry_after_s == pytest.approx(10.0)
    await limits.settle(1, spec, taken(admitted), actual_tokens=200, actual_cost_usd=ZERO)
    after = await limits.admit(1, spec, tokens=200, cost_usd=ZERO)
    assert after.allowed and after.tokens is not None and after.tokens.remaining == 200


async def test_an_overshoot_is_paid_back_before_the_next_request_passes() -> None:
    limits, clock, _ = limiter()
    spec = LimitSpec(tpm=600)
    admitted = await limits.admit(1, spec, tokens=500, cost_usd=ZERO)
    # The response used 600 tokens more than reserved: the bucket goes to -500.
    await limits.settle(1, spec, taken(admitted), actual_tokens=1100, actual_cost_usd=ZERO)
    refused = await limits.admit(1, spec, tokens=100, cost_usd=ZERO)
    assert refused.reason == "tpm" and refused.retry_after_s == pytest.approx(60.0)
    assert refused.tokens is not None and refused.tokens.remaining == 0
    clock.advance(59.9)
    assert not (await limits.admit(1, spec, tokens=100, cost_usd=ZERO)).allowed
    clock.advance(0.1)
    assert (await limits.admit(1, spec, tokens=100, cost_usd=ZERO)).allowed


async def test_a_request_larger_than_the_tpm_capacity_is_refused_without_a_retry_time_and_takes_nothing() -> None:
    limits, _, _ = limiter()
    spec = LimitSpec(rpm=10, tpm=1000)
    refused = await limits.admit(1, spec, tokens=1001, cost_usd=ZERO)
    assert (refused.allowed, refused.reason, refused.retry_after_s) == (False, "tpm", None)
    fits = await limits.admit(1, spec, tokens=1000, cost_usd=ZERO)
    assert fits.allowed and fits.requests is not None and fits.requests.remaining == 9


async def test_a_refusal_takes_nothing_from_the_other_dimensions() -> None:
    limits, _, _ = limiter()
    spec = LimitSpec(rpm=60, burst=2, tpm=1000, budget_usd=Decimal(10))
    await seed(limits, 1, spec)
    assert (await limits.admit(1, spec, tokens=900, cost_usd=Decimal(1))).allowed
    refused = await limits.admit(1, spec, tokens=200, cost_usd=Decimal(1))
    assert refused.reason == "tpm"
    assert refused.requests is not None and refused.requests.remaining == 1
    assert refused.budget_remaining_usd == Decimal(9)


async def test_a_spent_budget_is_reported_before_rpm_and_rpm_before_tpm() -> None:
    limits, _, _ = limiter()
    spec = LimitSpec(rpm=1, tpm=100, budget_usd=Decimal(1))
    await seed(limits, 1, spec)
    assert (await limits.admit(1, spec, tokens=100, cost_usd=Decimal(1))).allowed
    # Now all three are exhausted: the refusal names the budget (waiting will not help), then rpm, tpm.
    refused = await limits.admit(1, spec, tokens=100, cost_usd=Decimal(1))
    assert refused.reason == "budget" and refused.retry_after_s is None
    no_budget = LimitSpec(rpm=1, tpm=100)
    assert (await limits.admit(1, no_budget, tokens=100, cost_usd=Decimal(0))).reason == "rpm"
    no_rpm = LimitSpec(tpm=100)
    assert (await limits.admit(1, no_rpm, tokens=100, cost_usd=Decimal(0))).reason == "tpm"


async def test_budget_reservations_let_exactly_what_fits_through_concurrent_admits() -> None:
    limits, _, _ = limiter()
    spec = LimitSpec(budget_usd=Decimal("5.5"))
    await seed(limits, 7, spec)
    answers = await asyncio.gather(*(limits.admit(7, spec, tokens=0, cost_usd=Decimal(1)) for _ in range(10)))
    assert sum(a.allowed for a in answers) == 5
    refused = [a for a in answers if not a.allowed]
    assert all(a.reason == "budget" and a.retry_after_s is None for a in refused)
    assert refused[0].budget_remaining_usd == Decimal("0.5")


async def test_settling_to_the_actual_cost_frees_the_rest_of_the_reservation() -> None:
    limits, _, _ = limiter()
    spec = LimitSpec(budget_usd=Decimal("2"))
    await seed(limits, 1, spec)
    first = await limits.admit(1, spec, tokens=0, cost_usd=Decimal(1))
    assert (await limits.admit(1, spec, tokens=0, cost_usd=Decimal(1))).allowed
    assert (await limits.admit(1, spec, tokens=0, cost_usd=Decimal("0.5"))).reason == "budget"
    await limits.settle(1, spec, taken(first), actual_tokens=0, actual_cost_usd=Decimal("0.25"))
    admitted = await limits.admit(1, spec, tokens=0, cost_usd=Decimal("0.5"))
    assert admitted.allowed and admitted.budget_remaining_usd == Decimal("0.25")


async def test_a_settled_cost_above_the_reservation_is_charged() -> None:
    limits, _, _ = limiter()
    spec = LimitSpec(budget_usd=Decimal(1))
    await seed(limits, 1, spec)
    admitted = await limits.admit(1, spec, tokens=0, cost_usd=Decimal("0.1"))
    await limits.settle(1, spec, taken(admitted), actual_tokens=0, actual_cost_usd=Decimal("1.2"))
    refused = await limits.admit(1, spec, tokens=0, cost_usd=Decimal("0.000000001"))
    assert refused.reason == "budget" and refused.budget_remaining_usd == 0


async def test_a_daily_budget_asks_for_a_seed_again_at_the_utc_day_boundary() -> None:
    clock, wall = FakeClock(0.0), wall_at("2025-03-31T23:59:59")
    limits = MemoryLimiter(clock=clock, wall_clock=wall)
    spec = LimitSpec(budget_usd=Decimal(1), budget_period="day")
    await seed(limits, 1, spec)
    assert (await limits.admit(1, spec, tokens=0, cost_usd=Decimal(1))).allowed
    assert (await limits.admit(1, spec, tokens=0, cost_usd=Decimal(1))).reason == "budget"
    wall.advance(1)  # 2025-04-01T00:00:00Z
    asked = await limits.admit(1, spec, tokens=0, cost_usd=Decimal(1))
    assert asked.period is not None and asked.period.id == "2025-04-01"
    assert asked.period.start == datetime(2025, 4, 1, tzinfo=UTC)
    await limits.seed(1, spec, PeriodSpend(asked.period, ZERO))
    assert (await limits.admit(1, spec, tokens=0, cost_usd=Decimal(1))).allowed
    wall.advance(86399)
    assert not (await limits.admit(1, spec, tokens=0, cost_usd=Decimal(1))).allowed


async def test_a_monthly_budget_resets_at_the_utc_month_boundary_and_not_before() -> None:
    clock, wall = FakeClock(0.0), wall_at("2024-02-01T00:00:00")
    limits = MemoryLimiter(clock=clock, wall_clock=wall)
    spec = LimitSpec(budget_usd=Decimal(1), budget_period="month")
    await seed(limits, 1, spec)
    assert (await limits.admit(1, spec, tokens=0, cost_usd=Decimal(1))).allowed
    wall.advance(28 * 86400 + 86399)  # 2024-02-29T23:59:59Z, a leap day
    assert (await limits.admit(1, spec, tokens=0, cost_usd=Decimal(1))).reason == "budget"
    wall.advance(1)
    asked = await limits.admit(1, spec, tokens=0, cost_usd=Decimal(1))
    assert asked.period is not None and (asked.period.id, asked.period.start) == (
        "2024-03",
        datetime(2024, 3, 1, tzinfo=UTC),
    )


async def test_a_lifetime_budget_never_resets() -> None:
    limits, _, wall = limiter()
    spec = LimitSpec(budget_usd=Decimal(1))
    await seed(limits, 1, spec)
    assert (await limits.admit(1, spec, tokens=0, cost_usd=Decimal(1))).allowed
    wall.advance(400 * 86400)
    assert (await limits.admit(1, spec, tokens=0, cost_usd=Decimal(1))).reason == "budget"


async def test_unlimited_dimensions_admit_everything_and_report_no_state() -> None:
    limits, _, _ = limiter()
    for _ in range(1000):
        answer = await limits.admit(1, LimitSpec(), tokens=10**9, cost_usd=Decimal(10**6))
        assert answer.allowed
    assert (answer.requests, answer.tokens, answer.budget_remaining_usd) == (None, None, None)
    only_rpm = await limits.admit(2, LimitSpec(rpm=5), tokens=10**9, cost_usd=Decimal(10**6))
    assert only_rpm.allowed and only_rpm.tokens is None and only_rpm.budget_remaining_usd is None


async def test_state_is_bounded_by_max_keys_and_an_evicted_key_starts_fresh() -> None:
    limits, _, _ = limiter(max_keys=3)
    spec = LimitSpec(rpm=60, burst=1)
    for key_id in range(10):
        assert (await limits.admit(key_id, spec, tokens=0, cost_usd=ZERO)).allowed
    assert len(limits) == 3
    assert not (await limits.admit(9, spec, tokens=0, cost_usd=ZERO)).allowed  # still tracked
    assert (await limits.admit(0, spec, tokens=0, cost_usd=ZERO)).allowed  # evicted: full again


async def test_idle_keys_are_dropped_once_refilled_but_unspent_budgets_are_kept() -> None:
    limits, clock, _ = limiter()
    await seed(limits, 2, LimitSpec(budget_usd=Decimal(1)))
    await limits.admit(2, LimitSpec(budget_usd=Decimal(1)), tokens=0, cost_usd=Decimal("0.5"))
    await limits.admit(1, LimitSpec(rpm=60, burst=1), tokens=0, cost_usd=ZERO)
    clock.advance(1.5)
    await limits.admit(3, LimitSpec(rpm=60), tokens=0, cost_usd=ZERO)
    assert len(limits) == 2  # key 1 refilled and went, though key 2 is older; key 2's spend must survive
    answer = await limits.admit(2, LimitSpec(budget_usd=Decimal(1)), tokens=0, cost_usd=Decimal("0.6"))
    assert answer.reason == "budget"


async def test_scale_multiplies_every_limit() -> None:
    limits, _, _ = limiter(scale=0.5)
    spec = LimitSpec(rpm=60, burst=10, tpm=1000, budget_usd=Decimal(10))
    await seed(limits, 1, spec)
    first = await limits.admit(1, spec, tokens=100, cost_usd=Decimal(1))
    assert first.requests is not None and first.tokens is not None
    assert (first.requests.limit, first.tokens.limit) == (5, 500)
    assert first.budget_remaining_usd == Decimal(4)
    answers = [await limits.admit(1, spec, tokens=0, cost_usd=ZERO) for _ in range(5)]
    assert [a.allowed for a in answers] == [True] * 4 + [False]
    assert answers[-1].retry_after_s == pytest.approx(2.0)  # half the rate: 0.5 requests per second


async def test_under_scale_a_request_larger_than_the_share_waits_for_a_full_bucket_then_overdraws() -> None:
    limits, clock, _ = limiter(scale=0.25)
    spec = LimitSpec(tpm=600)  # local share: 150 tokens, 2.5 per second
    assert (await limits.admit(1, spec, tokens=50, cost_usd=ZERO)).allowed
    refused = await limits.admit(1, spec, tokens=400, cost_usd=ZERO)
    assert refused.reason == "tpm" and refused.retry_after_s == pytest.approx(20.0)
    clock.advance(20.0)
    big = await limits.admit(1, spec, tokens=400, cost_usd=ZERO)
    assert big.allowed and big.tokens is not None and big.tokens.reset_s == pytest.approx(160.0)


async def test_a_tiny_scale_still_lets_one_request_through() -> None:
    limits, _, _ = limiter(scale=0.1)
    assert (await limits.admit(1, LimitSpec(rpm=2), tokens=0, cost_usd=ZERO)).allowed


def test_money_is_exact_nano_usd_rounding_charges_up_and_budgets_down() -> None:
    per_token = Decimal("0.15") / Decimal(1_000_000)
    assert usd_to_nanos(per_token, round_up=True) == 150
    assert usd_to_nanos(per_token * 1234, round_up=True) == 185_100
    tiny = Decimal("0.0000000001")
    assert (usd_to_nanos(tiny, round_up=True), usd_to_nanos(tiny, round_up=False)) == (1, 0)
    huge = Decimal("123456789012345678901234567890.123456789")  # beyond Decimal's 28 digits
    assert usd_to_nanos(huge, round_up=True) == 123456789012345678901234567890123456789
    assert nanos_to_usd(1_500_000_001) == Decimal("1.500000001")


def test_limits_that_could_never_refill_are_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="rpm"):
        LimitSpec(rpm=0)
    with pytest.raises(ValueError, match="budget_usd"):
        LimitSpec(budget_usd=Decimal(-1))


async def test_negative_amounts_are_a_caller_bug() -> None:
    limits, _, _ = limiter()
    with pytest.raises(ValueError, match="tokens"):
        await limits.admit(1, LimitSpec(), tokens=-1, cost_usd=ZERO)


# Seeding: the limiter only stores; a budget's spend comes from the durable record (see ledger.py).


async def test_a_budget_without_state_asks_for_a_seed_and_takes_nothing_meanwhile() -> None:
    limits, _, _ = limiter()
    spec = LimitSpec(rpm=60, burst=1, tpm=1000, budget_usd=Decimal(10))
    asked = await limits.admit(1, spec, tokens=1000, cost_usd=Decimal(1))
    assert (asked.allowed, asked.reason, asked.reservation) == (False, "seed", None)
    assert asked.period == Period("life", None)
    await limits.seed(1, spec, PeriodSpend(asked.period, Decimal(4)))
    admitted = await limits.admit(1, spec, tokens=1000, cost_usd=Decimal(1))  # the burst of one is still there
    assert admitted.allowed and admitted.budget_remaining_usd == Decimal(5)
    assert admitted.tokens is not None and admitted.tokens.remaining == 0


async def test_keys_without_a_budget_never_ask_for_a_seed() -> None:
    limits, _, _ = limiter()
    assert (await limits.admit(1, LimitSpec(rpm=60, tpm=1000), tokens=10, cost_usd=Decimal(1))).allowed


async def test_a_seed_counts_once_however_many_callers_seed_at_the_same_time() -> None:
    limits, _, _ = limiter()
    spec = LimitSpec(budget_usd=Decimal(10), budget_period="month")
    asked = await limits.admit(1, spec, tokens=0, cost_usd=ZERO)
    assert asked.period is not None and asked.period.id == "2025-03"
    await asyncio.gather(*(limits.seed(1, spec, PeriodSpend(asked.period, Decimal(3))) for _ in range(20)))
    await limits.seed(1, spec, PeriodSpend(asked.period, Decimal(7)))  # a later seed changes nothing either
    assert (await limits.admit(1, spec, tokens=0, cost_usd=Decimal(1))).budget_remaining_usd == Decimal(6)


async def test_a_seed_read_for_a_period_that_has_ended_is_ignored() -> None:
    limits, _, wall = limiter()
    spec = LimitSpec(budget_usd=Decimal(10), budget_period="day")
    asked = await limits.admit(1, spec, tokens=0, cost_usd=ZERO)
    assert asked.period is not None
    wall.advance(86400)
    await limits.seed(1, spec, PeriodSpend(asked.period, Decimal(9)))  # yesterday's spend
    again = await limits.admit(1, spec, tokens=0, cost_usd=ZERO)
    assert again.reason == "seed" and again.period is not None and again.period.id == "2025-03-16"


async def test_the_fallback_share_of_a_seeded_budget_is_the_share_of_what_is_left() -> None:
    limits, _, _ = limiter(scale=0.5)
    spec = LimitSpec(budget_usd=Decimal(10))
    await seed(limits, 1, spec, spent=Decimal(6))
    # (10 - 6) / 2 instances: this instance may spend 2 of the 4 left.
    assert (await limits.admit(1, spec, tokens=0, cost_usd=ZERO)).budget_remaining_usd == Decimal(2)
    assert (await limits.admit(1, spec, tokens=0, cost_usd=Decimal("2.000000001"))).reason == "budget"


async def test_a_seeded_budget_is_kept_while_idle_even_with_nothing_spent() -> None:
    limits, clock, _ = limiter()
    budgeted = LimitSpec(budget_usd=Decimal(1))
    await seed(limits, 1, budgeted)
    clock.advance(3600)
    for key_id in range(2, 10):
        await limits.admit(key_id, LimitSpec(rpm=60), tokens=0, cost_usd=ZERO)
    assert (await limits.admit(1, budgeted, tokens=0, cost_usd=ZERO)).allowed  # no second seed needed


async def test_settling_after_the_state_was_lost_and_seeded_again_charges_the_call_in_full() -> None:
    limits, _, _ = limiter(max_keys=1)
    spec = LimitSpec(budget_usd=Decimal(10))
    await seed(limits, 1, spec)
    in_flight = await limits.admit(1, spec, tokens=0, cost_usd=Decimal(1))
    await limits.admit(2, LimitSpec(rpm=60), tokens=0, cost_usd=ZERO)  # evicts key 1
    # The record knows 2 USD of other requests, not the one in flight (its row comes after its settlement).
    await seed(limits, 1, spec, spent=Decimal(2))
    await limits.settle(1, spec, taken(in_flight), actual_tokens=0, actual_cost_usd=Decimal("0.25"))
    # Neither a refund of the lost 1 USD reservation from the seeded 2 USD, nor nothing: 2 + 0.25.
    assert (await limits.admit(1, spec, tokens=0, cost_usd=ZERO)).budget_remaining_usd == Decimal("7.75")


async def test_settling_while_the_state_is_lost_changes_nothing() -> None:
    limits, _, _ = limiter(max_keys=1)
    spec = LimitSpec(budget_usd=Decimal(10))
    await seed(limits, 1, spec)
    in_flight = await limits.admit(1, spec, tokens=0, cost_usd=Decimal(1))
    await limits.admit(2, LimitSpec(rpm=60), tokens=0, cost_usd=ZERO)  # evicts key 1
    await limits.settle(1, spec, taken(in_flight), actual_tokens=0, actual_cost_usd=Decimal("0.25"))
    await seed(limits, 1, spec, spent=Decimal("2.25"))  # the record, this call's row included by now
    assert (await limits.admit(1, spec, tokens=0, cost_usd=ZERO)).budget_remaining_usd == Decimal("7.75")


async def test_a_call_admitted_yesterday_and_settled_today_is_not_charged_to_today() -> None:
    clock, wall = FakeClock(0.0), wall_at("2025-03-31T23:59:59")
    limits = MemoryLimiter(clock=clock, wall_clock=wall)
    spec = LimitSpec(budget_usd=Decimal(10), budget_period="day")
    await seed(limits, 1, spec)
    late = await limits.admit(1, spec, tokens=0, cost_usd=Decimal(1))
    wall.advance(2)
    await seed(limits, 1, spec)
    await limits.settle(1, spec, taken(late), actual_tokens=0, actual_cost_usd=Decimal("0.5"))
    assert (await limits.admit(1, spec, tokens=0, cost_usd=ZERO)).budget_remaining_usd == Decimal(10)


async def test_a_tasks_later_model_calls_do_not_reset_its_keys_request_bucket() -> None:
    """A task's later model calls admit without rpm; that must not make the key look idle and be dropped
    with its spent request bucket (129 tool-calling tasks once passed a 60-per-minute key in 5 s)."""
    limits, clock, _ = limiter()
    spec = LimitSpec(rpm=60, burst=2, tpm=1_000_000)
    later_call = LimitSpec(tpm=1_000_000)  # what Ticket.reserve admits for a task's second model call
    admitted = 0
    for _ in range(10):
        if (await limits.admit(1, spec, tokens=10, cost_usd=ZERO)).allowed:
            admitted += 1
            await limits.admit(1, later_call, tokens=10, cost_usd=ZERO)
        for other in range(2, 7):  # other keys' traffic drives the idle purge
            await limits.admit(other, later_call, tokens=1, cost_usd=ZERO)
        clock.advance(0.01)
    assert admitted == 2
