"""The Lua scripts of the Redis session store: begin a turn, finish it (append and release), release, delete."""

# A session is one hash, `<prefix>:{<key id>}:s:<session id>`: `c` created and `u` last used (Redis's
# clock, Unix ms), `h` the number of the oldest turn kept and `n` the next, `b` the stored bytes and
# `k` the tokens of the turns kept, `l` the task whose turn was appended last, and one field per turn
# (its number) holding the stored turn. Its TTL is sessions.ttl_s, refreshed on use. The turn running
# now holds `...:busy:<session id>` (its task id, for at most the task's timeout). Two sorted sets
# list a key's sessions: `...:ids` (by id, all scores 0) and `...:expiries` (by when each expires),
# from which expired ids are pruned.

from __future__ import annotations

_PRELUDE = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)

local function touch_index(ids, expiries, session_id, ttl)
  redis.call('ZADD', ids, 0, session_id)
  redis.call('ZADD', expiries, now + ttl, session_id)
  -- Every member expires by then, so the index may too.
  redis.call('PEXPIRE', ids, ttl)
  redis.call('PEXPIRE', expiries, ttl)
end

local function prune_index(ids, expiries)
  local gone = redis.call('ZRANGEBYSCORE', expiries, '-inf', now, 'LIMIT', 0, 100)
  if #gone > 0 then
    redis.call('ZREM', ids, unpack(gone))
    redis.call('ZREM', expiries, unpack(gone))
  end
end

local function tokens_of(turn)
  return tonumber(string.match(turn, '^(%d+)\\n'))
end
"""

# KEYS: session, busy, ids, expiries. ARGV: task id, hold ms, ttl ms, session id.
# Returns {'busy', holder} or {'ok', turn, turn, ...} (oldest first; none for a new session).
BEGIN_LUA = (
    _PRELUDE
    + """
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then return {'busy', holder} end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
local reply = {'ok'}
local meta = redis.call('HMGET', KEYS[1], 'h', 'n')
if not meta[1] then return reply end
local ttl = tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 'u', string.format('%.0f', now))
redis.call('PEXPIRE', KEYS[1], ttl)
touch_index(KEYS[3], KEYS[4], ARGV[4], ttl)
local first, stop = tonumber(meta[1]), tonumber(meta[2])
-- In slices: unpack() of thousands of fields would overflow Lua's stack.
while first < stop do
  local last = math.min(stop - 1, first + 199)
  local fields = {}
  for field = first, last do fields[#fields + 1] = field end
  for _, turn in ipairs(redis.call('HMGET', KEYS[1], unpack(fields))) do reply[#reply + 1] = turn end
  first = last + 1
end
return reply
"""
)

# KEYS: session, busy, ids, expiries. ARGV: task id, turn, max session bytes, ttl ms, session id.
# Returns {'ok', turns trimmed} or {reason, 0}: hold_expired (another task holds the session now),
# turn_too_large. A call retried after its answer was lost finds its turn appended (`l`) and adds
# nothing.
FINISH_LUA = (
    _PRELUDE
    + """
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then return {'hold_expired', 0} end
if holder then redis.call('DEL', KEYS[2]) end
if redis.call('HGET', KEYS[1], 'l') == ARGV[1] then return {'ok', 0} end
local turn, limit, ttl = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
if #turn > limit then return {'turn_too_large', 0} end
local stamp = string.format('%.0f', now)
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'c', stamp, 'h', 0, 'n', 0, 'b', 0, 'k', 0)
end
local number = redis.call('HINCRBY', KEYS[1], 'n', 1) - 1
redis.call('HSET', KEYS[1], number, turn, 'u', stamp, 'l', ARGV[1])
local size = redis.call('HINCRBY', KEYS[1], 'b', #turn)
local tokens = redis.call('HINCRBY', KEYS[1], 'k', tokens_of(turn))
local head = tonumber(redis.call('HGET', KEYS[1], 'h'))
local trimmed = 0
-- Whole turns only, oldest first; the new turn alone fits, so it stays.
while size > limit and head < number do
  local old = redis.call('HGET', KEYS[1], head)
  size = size - #old
  tokens = tokens - tokens_of(old)
  redis.call('HDEL', KEYS[1], head)
  head = head + 1
  trimmed = trimmed + 1
end
if trimmed > 0 then redis.call('HSET', KEYS[1], 'h', head, 'b', size, 'k', tokens) end
redis.call('PEXPIRE', KEYS[1], ttl)
touch_index(KEYS[3], KEYS[4], ARGV[5], ttl)
prune_index(KEYS[3], KEYS[4])
return {'ok', trimmed}
"""
)

# KEYS: busy. ARGV: task id. Only the holder releases: a late release never frees another turn's hold.
RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""

# KEYS: session, busy, ids, expiries. ARGV: session id. Returns {'busy', holder} or {'ok', 1 | 0}.
DELETE_LUA = """
local holder = redis.call('GET', KEYS[2])
if holder then return {'busy', holder} end
local existed = redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
return {'ok', existed}
"""

# KEYS: ids, expiries. ARGV: list after this id ('' from the start), how many.
PAGE_LUA = (
    _PRELUDE
    + """
prune_index(KEYS[1], KEYS[2])
local start = ARGV[1] == '' and '-' or '(' .. ARGV[1]
return redis.call('ZRANGEBYLEX', KEYS[1], start, '+', 'LIMIT', 0, tonumber(ARGV[2]))
"""
)
