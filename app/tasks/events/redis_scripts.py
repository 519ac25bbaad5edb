"""The Lua scripts of the Redis event log and the packed format its batches and pages travel in."""

from __future__ import annotations

import struct

from app.tasks.events.base import TERMINAL_TYPES, LoggedEvent

# Batches go to Redis and pages come back as one string of packed events, `>IHI` (seq, type length,
# data length) then the type and the data: redis-py's parser costs about 37 us per stream entry
# (measured), its command packer about 5 us per argument; one string costs about 1 us an event.
PACKED_HEADER = struct.Struct(">IHI")

_TERMINAL_LUA = "{" + ", ".join(f"[{name!r}] = true" for name in sorted(TERMINAL_TYPES)) + "}"

# The last entry's seq (nil when the stream does not exist), whether it is a terminal event, and its
# data. Entries hold the fields t (type) and d (data), in that order.
_LAST_ENTRY_LUA = (
    "local TERMINAL = "
    + _TERMINAL_LUA
    + """
local function last_entry(key)
  local last = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)[1]
  if not last then return nil, false, nil end
  return tonumber(string.match(last[1], '^(%d+)')), TERMINAL[last[2][2]] == true, last[2][4]
end
"""
)

# KEYS: the stream. ARGV: MAXLEN, PEXPIRE ms, '1' to write the open entry, the packed events.
# Events at or below the stream's last seq are skipped: a retried batch that was stored before its
# answer was lost. Nothing is added after a terminal event other than this batch's own (the log was
# finalised by another instance, which took this writer for dead). Returns {events added, the
# stream's last seq, the seq from which the batch was refused because the log had ended, or 0}.
APPEND_LUA = (
    _LAST_ENTRY_LUA
    + """
local last_seq, ended, last_data = last_entry(KEYS[1])
if last_seq == nil then
  last_seq = 0
  if ARGV[3] == '1' then redis.call('XADD', KEYS[1], '0-1', 't', '', 'd', '') end
end
local packed, pos, added, refused = ARGV[4], 1, 0, 0
while pos <= #packed do
  local seq, type_length, data_length, at = struct.unpack('>IHI', packed, pos)
  local kind = string.sub(packed, at, at + type_length - 1)
  pos = at + type_length + data_length
  if seq > last_seq then
    if ended then
      refused = seq
      break
    end
    local data = string.sub(packed, at + type_length, pos - 1)
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], string.format('%d-0', seq), 't', kind, 'd', data)
    last_seq = seq
    added = added + 1
  elseif seq == last_seq and ended and string.sub(packed, at + type_length, pos - 1) ~= last_data then
    refused = seq  -- the terminal event stored at this seq is another instance's, not this one's
    break
  end
end
if refused == 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return {added, last_seq, refused}
"""
)

# KEYS: the stream. ARGV: the first seq wanted, how many. Returns {0} when there is no stream, else
# {1, the last seq, 1 if it is a terminal event, the packed events from the first seq wanted on}.
READ_LUA = (
    _LAST_ENTRY_LUA
    + """
local last_seq, ended = last_entry(KEYS[1])
if last_seq == nil then return {0} end
local parts = {}
for i, entry in ipairs(redis.call('XRANGE', KEYS[1], ARGV[1] .. '-0', '+', 'COUNT', ARGV[2])) do
  local fields = entry[2]
  local seq = tonumber(string.match(entry[1], '^(%d+)'))
  parts[i] = struct.pack('>IHI', seq, #fields[2], #fields[4]) .. fields[2] .. fields[4]
end
return {1, last_seq, ended and 1 or 0, table.concat(parts)}
"""
)

# KEYS: the stream. ARGV: the last seq the caller saw ('' to ask), type, data, MAXLEN, PEXPIRE ms.
# Returns {1, seq} when appended, {0, last seq} when the log had ended, {-1, last seq} when the
# caller's last seq is not the stream's (it must build its event again for the next seq).
FINAL_LUA = (
    _LAST_ENTRY_LUA
    + """
local last_seq, ended = last_entry(KEYS[1])
last_seq = last_seq or 0
if ended then return {0, last_seq} end
if ARGV[1] == '' or tonumber(ARGV[1]) ~= last_seq then return {-1, last_seq} end
local seq = last_seq + 1
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[4], string.format('%d-0', seq), 't', ARGV[2], 'd', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return {1, seq}
"""
)


def pack_events(events: list[LoggedEvent]) -> bytes:
    parts: list[bytes] = []
    pack = PACKED_HEADER.pack
    for item in events:
        kind = item.type.encode()
        parts += (pack(item.seq, len(kind), len(item.data)), kind, item.data)
    return b"".join(parts)


def unpack_events(packed: bytes, types: dict[bytes, str]) -> list[LoggedEvent]:
    """`types` caches the decoded type names (a stream has a handful)."""
    events = []
    unpack = PACKED_HEADER.unpack_from
    header = PACKED_HEADER.size
    offset, size = 0, len(packed)
    while offset < size:
        seq, type_length, data_length = unpack(packed, offset)
        offset += header
        raw_type = packed[offset : offset + type_length]
        offset += type_length
        kind = types.get(raw_type)
        if kind is None:
            kind = types[raw_type] = raw_type.decode()
        events.append(LoggedEvent(seq, kind, packed[offset : offset + data_length]))
        offset += data_length
    return events
