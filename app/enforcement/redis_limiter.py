"""A Limiter shared by every instance: each admit, settle and seed is one Lua script run on Redis's own clock."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from app.enforcement.limits import (
    Admission,
    LimitSpec,
    Period,
    PeriodSpend,
    Reason,
    Reservation,
    bucket_state,
    check_request,
    nanos_to_usd,
    needs_seed,
    never_fits_admission,
    refill_wait,
    usd_to_nanos,
)
from app.enforcement.redis_wire import RespScripts, supports

# Shared by every script. Every time comes from the server (TIME), so instances whose clocks
# disagree still share one bucket; budget periods are UTC days and months of that same clock.
LUA_PRELUDE = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
-- Float refill arithmetic must not refuse a caller who waited exactly the retry_after we gave.
local EPSILON = 1e-9

local function fmt(x) return string.format('%.17g', x) end

local function level(key, capacity, rate)
  local stored = redis.call('HMGET', key, 'tokens', 'ts')
  local tokens, ts = tonumber(stored[1]), tonumber(stored[2])
  if tokens == nil or ts == nil then return capacity end
  local elapsed = now - ts
  if elapsed < 0 then elapsed = 0 end  -- the server clock may step back after a failover
  return math.min(capacity, tokens + elapsed * rate)
end

local function store(key, capacity, rate, tokens)
  redis.call('HSET', key, 'tokens', fmt(tokens), 'ts', fmt(now))
  -- A full bucket and a missing key mean the same: let the key go once it has refilled.
  redis.call('PEXPIRE', key, math.ceil((capacity - tokens) / rate * 1000) + 1000)
end

-- Days since 1970-01-01 to a Gregorian date. Years are counted from 1 March, so the leap day
-- is the last day of a year; 146097 days make 400 years, 36524 a century, 1461 four years.
local function civil_from_days(days)
  local z = days + 719468
  local era = math.floor(z / 146097)
  local day_of_era = z - era * 146097
  local year_of_era = math.floor((day_of_era - math.floor(day_of_era / 1460)
    + math.floor(day_of_era / 36524) - math.floor(day_of_era / 146096)) / 365)
  local day_of_year = day_of_era - (365 * year_of_era + math.floor(year_of_era / 4) - math.floor(year_of_era / 100))
  local march_month = math.floor((5 * day_of_year + 2) / 153)
  local day = day_of_year - math.floor((153 * march_month + 2) / 5) + 1
  local month = march_month < 10 and march_month + 3 or march_month - 9
  local year = year_of_era + era * 400
  if month <= 2 then year = year + 1 end
  return year, month, day
end

local MONTH_DAYS = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31}

-- The current budget period's id, the seconds until it ends and its start in Unix seconds (both
-- nil for a lifetime budget).
local function period(kind)
  if kind == '' then return 'life', nil, nil end
  local days = math.floor(now / 86400)
  local year, month, day = civil_from_days(days)
  if kind == 'day' then
    return string.format('%04d-%02d-%02d', year, month, day), (days + 1) * 86400 - now, days * 86400
  end
  local length = MONTH_DAYS[month]
  if month == 2 and ((year % 4 == 0 and year % 100 ~= 0) or year % 400 == 0) then length = 29 end
  local first = days - day + 1
  return string.format('%04d-%02d', year, month), (first + length) * 86400 - now, first * 86400
end
"""

# A budget hash holds `period`, `spent` (nano-USD, reservations included, kept an exact 64-bit
# integer by HINCRBY) and `epoch` (this seeding of it). Only SEED_LUA creates one; a hash for
# another period counts as none, and its key expires when its period ends.

# KEYS: request bucket, token bucket, budget.
# ARGV: rpm, request capacity, tpm, tokens wanted, budget nano-USD, cost nano-USD, period kind;
# an empty rpm, tpm or budget means unlimited. Returns reason ('' when admitted), the request
# and token levels after the call, the nano-USD spent in the period ('' when unlimited) and the
# budget's epoch; or, with reason 'seed' and nothing taken, the period id and its start.
ADMIT_LUA = (
    LUA_PRELUDE
    + """
local rpm, request_capacity = tonumber(ARGV[1]), tonumber(ARGV[2])
local tpm, wanted = tonumber(ARGV[3]), tonumber(ARGV[4])
local budget, cost, kind = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7]

local spent, epoch
if budget then
  local period_id, _, starts_at = period(kind)
  local stored = redis.call('HMGET', KEYS[3], 'period', 'spent', 'epoch')
  if stored[1] ~= period_id then
    return {'seed', period_id, starts_at and string.format('%.0f', starts_at) or ''}
  end
  spent, epoch = tonumber(stored[2]) or 0, stored[3] or ''
end

local reason = ''
local requests, tokens
if rpm then
  requests = level(KEYS[1], request_capacity, rpm / 60)
  if requests + EPSILON < 1 then reason = 'rpm' end
end
if tpm then
  tokens = level(KEYS[2], tpm, tpm / 60)
  if reason == '' and tokens + EPSILON < wanted then reason = 'tpm' end
end
-- A spent budget outranks a busy bucket: waiting will not help, so say so.
if budget and spent + cost > budget then reason = 'budget' end

-- Nothing is written on a refusal: the refilled levels follow from the stored ones anyway.
if reason == '' then
  if rpm then
    requests = requests - 1
    store(KEYS[1], request_capacity, rpm / 60, requests)
  end
  if tpm then
    tokens = tokens - wanted
    store(KEYS[2], tpm, tpm / 60, tokens)
  end
  if budget then spent = redis.call('HINCRBY', KEYS[3], 'spent', cost) end
end
return {
  reason,
  requests and fmt(requests) or '',
  tokens and fmt(tokens) or '',
  spent and string.format('%.0f', spent) or '',
  epoch or '',
}
"""
)

# KEYS: token bucket, budget. ARGV: tpm ('' unlimited), tokens to give back (negative: take),
# budget flag ('' unlimited), actual and reserved nano-USD, period kind, the reservation's epoch.
SETTLE_LUA = (
    LUA_PRELUDE
    + """
local tpm, give_back = tonumber(ARGV[1]), tonumber(ARGV[2])
local has_budget, actual, reserved, kind, epoch = ARGV[3] ~= '', tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6], ARGV[7]
if tpm and give_back ~= 0 then
  -- Going negative is the point: an overshoot is paid back before the next request passes.
  local tokens = math.min(tpm, level(KEYS[1], tpm, tpm / 60) + give_back)
  store(KEYS[1], tpm, tpm / 60, tokens)
end
if has_budget then
  local period_id = period(kind)
  local stored = redis.call('HMGET', KEYS[2], 'period', 'epoch')
  -- No state for this period: nothing to settle into; the next admit seeds it, this call included.
  if stored[1] == period_id then
    if (stored[2] or '') == epoch then
      redis.call('HINCRBY', KEYS[2], 'spent', actual - reserved)
    elseif string.sub(epoch, 1, #period_id + 1) == period_id .. '/' then
      -- Charged to a state since lost and seeded again this period: the seed cannot hold this
      -- call (a request's audit row is written after its settlements), so it is charged in full.
      redis.call('HINCRBY', KEYS[2], 'spent', actual)
    end
    -- Otherwise it was charged in an earlier period: that period's spend, not this one's.
  end
end
return 1
"""
)

# KEYS: budget. ARGV: period kind, the period id the spend was read for, nano-USD spent, a nonce.
# Returns 1 when seeded, 0 when the period has ended or the key has a state for it already
# (seeded by another instance, or charged since): the spend is never counted twice.
SEED_LUA = (
    LUA_PRELUDE
    + """
local period_id, ends_in = period(ARGV[1])
if period_id ~= ARGV[2] or redis.call('HGET', KEYS[1], 'period') == period_id then return 0 end
redis.call('HSET', KEYS[1], 'period', period_id, 'spent', ARGV[3], 'epoch', period_id .. '/' .. ARGV[4])
if ends_in == nil then
  redis.call('PERSIST', KEYS[1])
else
  redis.call('PEXPIRE', KEYS[1], math.ceil(ends_in * 1000) + 1000)
end
return 1
"""
)


def build_redis(url: str, *, timeout_s: float = 0.25) -> Redis:
    """One pooled client that fails fast: a limiter must not hold requests hostage to a slow Redis."""
    pool = BlockingConnectionPool.from_url(
        url,
        # redis-py 8's default pool raises once 100 connections are busy, which would look like an
        # outage under load; a bounded blocking pool queues briefly instead (a script takes < 1 ms).
        max_connections=64,
        timeout=2 * timeout_s,
        socket_connect_timeout=timeout_s,
        socket_timeout=timeout_s,
        # redis-py 8 retries 10 times by default; the ResilientLimiter decides what a failure means.
        # One immediate retry, on a reconnected socket, for a connection error only: after a Redis
        # restart every pooled connection is dead, and each would otherwise cost a cool-down of 503s.
        # Timeouts are not retried: a slow Redis must fail fast.
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        health_check_interval=2,
    )
    return Redis.from_pool(pool)  # the client owns the pool: aclose() closes both


def limiter_scripts(url: str | None, *, timeout_s: float = 0.25) -> RespScripts | None:
    """The limiter's script client for `url` (its own connections, the same fail-fast timeout as
    build_redis), or None where only redis-py can serve the URL (TLS, a Unix socket, options)."""
    return RespScripts(url, timeout_s=timeout_s) if url is not None and supports(url) else None


class RedisLimiter:
    """Keys live under `{prefix}:{{key_id}}:...`; the hash tag keeps one key's state in one cluster slot.

    The client is not owned: whoever built it (the lifespan) closes it. `scripts`, when given, runs the
    scripts instead (app/enforcement/redis_wire.py, a seventh of redis-py's CPU a call), and is owned:
    aclose() closes it.
    """

    def __init__(self, redis: Redis, prefix: str = "pacemaker:limits", scripts: RespScripts | None = None) -> None:
        self._redis = redis
        self._prefix = prefix
        self._scripts = scripts
        # Either sends EVALSHA and the script itself only when the server lacks it.
        register: Any = redis.register_script if scripts is None else scripts.script
        self._admit = register(ADMIT_LUA)
        self._settle = register(SETTLE_LUA)
        self._seed = register(SEED_LUA)

    def keys_for(self, key_id: int) -> tuple[str, str, str]:
        """The request bucket, token bucket and budget keys of one API key."""
        base = f"{self._prefix}:{{{key_id}}}"
        return f"{base}:requests", f"{base}:tokens", f"{base}:budget"

    async def admit(self, key_id: int, spec: LimitSpec, *, tokens: int, cost_usd: Decimal) -> Admission:
        check_request(tokens, cost_usd)
        if spec.never_fits(tokens):
            return never_fits_admission()
        budget = None if spec.budget_usd is None else usd_to_nanos(spec.budget_usd, round_up=False)
        args: list[Any] = [
            _optional(spec.rpm),
            _optional(spec.request_capacity),
            _optional(spec.tpm),
            tokens,
            _optional(budget),
            usd_to_nanos(cost_usd, round_up=True),
            spec.budget_period or "",
        ]
        reply = [_text(part) for part in await self._admit(keys=self.keys_for(key_id), args=args)]
        if reply[0] == "seed":
            return needs_seed(_period(reply[1], reply[2]))
        reason_text, requests_text, tokens_text, spent_text, epoch = reply
        reason: Reason | None = None
        retry_after: float | None = None
        if reason_text == "rpm" and spec.rpm is not None:
            reason, retry_after = "rpm", refill_wait(float(requests_text), 1, spec.rpm / 60)
        elif reason_text == "tpm" and spec.tpm is not None:
            reason, retry_after = "tpm", refill_wait(float(tokens_text), tokens, spec.tpm / 60)
        elif reason_text == "budget":
            reason = "budget"
        elif reason_text:
            raise RuntimeError(f"limiter script answered an unknown reason {reason_text!r}")
        request_capacity = spec.request_capacity
        return Admission(
            allowed=reason is None,
            reason=reason,
            retry_after_s=retry_after,
            requests=None
            if spec.rpm is None or request_capacity is None
            else bucket_state(request_capacity, spec.rpm / 60, float(requests_text)),
            tokens=None if spec.tpm is None else bucket_state(spec.tpm, spec.tpm / 60, float(tokens_text)),
            budget_remaining_usd=None if budget is None else nanos_to_usd(max(0, budget - int(spent_text))),
            reservation=None if reason is not None else Reservation(tokens, cost_usd, budget_epoch=epoch),
        )

    async def settle(
        self, key_id: int, spec: LimitSpec, reservation: Reservation, *, actual_tokens: int, actual_cost_usd: Decimal
    ) -> None:
        check_request(reservation.tokens, reservation.cost_usd)
        check_request(actual_tokens, actual_cost_usd)
        give_back = reservation.tokens - actual_tokens if spec.tpm is not None else 0
        actual = reserved = 0
        if spec.budget_usd is not None:
            actual = usd_to_nanos(actual_cost_usd, round_up=True)
            reserved = usd_to_nanos(reservation.cost_usd, round_up=True)
        if give_back == 0 and actual == reserved:
            return  # the reservation was exact: no round trip
        _, token_key, budget_key = self.keys_for(key_id)
        args: list[Any] = [
            _optional(spec.tpm),
            give_back,
            "" if spec.budget_usd is None else "1",
            actual,
            reserved,
            spec.budget_period or "",
            reservation.budget_epoch,
        ]
        await self._settle(keys=[token_key, budget_key], args=args)

    async def seed(self, key_id: int, spec: LimitSpec, spend: PeriodSpend) -> None:
        if spec.budget_usd is None:
            return
        args: list[Any] = [
            spec.budget_period or "",
            spend.period.id,
            usd_to_nanos(spend.usd, round_up=True),
            secrets.token_hex(8),  # unique per seeding, across instances
        ]
        await self._seed(keys=[self.keys_for(key_id)[2]], args=args)

    async def aclose(self) -> None:
        """The scripts' own connections, if any; the Redis client belongs to whoever built it."""
        if self._scripts is not None:
            await self._scripts.aclose()


def _optional(value: int | None) -> int | str:
    return "" if value is None else value


def _period(period_id: str, start_text: str) -> Period:
    return Period(period_id, datetime.fromtimestamp(int(start_text), UTC) if start_text else None)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
