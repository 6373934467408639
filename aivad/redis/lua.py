"""The Lua scripts of the Redis edge: each is one atomic step in Redis.

``#!lua`` (Redis 7): a script is refused as a whole when Redis is out of memory,
never half run. The log's keys (``meta``, ``stream``, ``ids``) are passed in
KEYS. Numbers are formatted with %d: Lua's default number format would write
large integers as 1e+14.
"""

from __future__ import annotations

_SEQ_OF = """
local function seq_of(id)
  return tonumber(string.sub(id, 1, string.find(id, '-', 1, true) - 1))
end
local function now_ms()
  local tm = redis.call('TIME')
  return tonumber(tm[1]) * 1000 + math.floor(tonumber(tm[2]) / 1000)
end
"""

#: The log's append step, shared by the scripts that append (a task's change appends its events
#: in the same atomic step): the epoch and rewind check, the clock, one entry.
_LOG_FNS = """
local function log_check(meta, epoch, seen)
  local current = redis.call('HGET', meta, 'epoch')
  if current ~= epoch then
    return 'AIVADEPOCH ' .. (current or '')
  end
  local counter = tonumber(redis.call('HGET', meta, 'seq') or '0')
  if counter < tonumber(seen) then
    return 'AIVADREWOUND ' .. string.format('%d', counter)
  end
  return nil
end
-- the stored-at time (ms, server clock), never below the last one stored
local function log_clock(meta)
  local tm = redis.call('TIME')
  local t = tonumber(tm[1]) * 1000 + math.floor(tonumber(tm[2]) / 1000)
  local last_t = tonumber(redis.call('HGET', meta, 't') or '0')
  if t < last_t then t = last_t end
  return t, last_t
end
-- one message: its new seq, or its original seq negated when message_id is known
local function log_add(meta, stream, ids, ts, mid, mtype, body)
  local known = redis.call('ZSCORE', ids, mid)
  if known then
    return -tonumber(known)
  end
  local seq = redis.call('HINCRBY', meta, 'seq', 1)
  redis.call('XADD', stream, string.format('%d-0', seq), 't', ts, 'type', mtype, 'd', body)
  redis.call('ZADD', ids, seq, mid)
  return seq
end
local function log_stored(meta, t, last_t)
  if t ~= last_t then
    redis.call('HSET', meta, 't', string.format('%d', t))
  end
end
"""

#: KEYS meta, stream, ids. ARGV expected epoch, the newest seq the caller has seen, then
#: (message_id, type, envelope JSON) per message.
#: Returns per message its seq, negated when it is a duplicate (the original's seq).
APPEND_LUA = "#!lua\n" + _LOG_FNS + """
local meta, stream, ids = KEYS[1], KEYS[2], KEYS[3]
local err = log_check(meta, ARGV[1], ARGV[2])
if err then
  return redis.error_reply(err)
end
if (#ARGV - 2) % 3 ~= 0 then
  return redis.error_reply('ERR aivad append: arguments must come in threes')
end
local t, last_t = log_clock(meta)
local ts = string.format('%d', t)
local out = {}
local stored = 0
for i = 3, #ARGV, 3 do
  local seq = log_add(meta, stream, ids, ts, ARGV[i], ARGV[i + 1], ARGV[i + 2])
  out[#out + 1] = seq
  if seq > 0 then stored = stored + 1 end
end
if stored > 0 then
  log_stored(meta, t, last_t)
end
return out
"""

#: KEYS meta, stream, ids. ARGV a new epoch, the seq floor, the epoch the caller knew ('' = none).
#: Returns {epoch, 0 adopted / 1 created / 2 re-based (same log, went back: new epoch, entries kept)}.
OPEN_LUA = "#!lua\n" + _SEQ_OF + """
local meta, stream, ids = KEYS[1], KEYS[2], KEYS[3]
local hint = tonumber(ARGV[2])
local epoch = redis.call('HGET', meta, 'epoch')
local seq = tonumber(redis.call('HGET', meta, 'seq') or '0')
if epoch then
  if hint > seq then
    redis.call('HSET', meta, 'seq', string.format('%d', hint))
    if epoch == ARGV[3] then
      -- the log this caller knew went back in time: same entries, but seqs it saw are free
      -- again; a new epoch tells every client, the counter moves above what it saw
      redis.call('HSET', meta, 'epoch', ARGV[1])
      return {ARGV[1], 2}
    end
  end
  return {epoch, 0}
end
-- a new log: whatever is left of an older one (a partial loss) is not part of it
local last = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
if #last > 0 and seq_of(last[1][1]) > seq then seq = seq_of(last[1][1]) end
if hint > seq then seq = hint end
redis.call('DEL', stream, ids)
local s = string.format('%d', seq)
redis.call('HSET', meta, 'epoch', ARGV[1], 'seq', s, 'floor', s, 't', '0', 'created_ms',
           string.format('%d', now_ms()))
return {ARGV[1], 1}
"""

#: KEYS meta, stream, ids. ARGV max_messages, max_age_ms, now_ms (0 = server time), max_delete,
#: expected epoch. Returns {deleted, floor, more}.
TRIM_LUA = "#!lua\n" + _SEQ_OF + """
local meta, stream, ids = KEYS[1], KEYS[2], KEYS[3]
local max_messages, max_age = tonumber(ARGV[1]), tonumber(ARGV[2])
local now, budget = tonumber(ARGV[3]), tonumber(ARGV[4])
local epoch = redis.call('HGET', meta, 'epoch')
if epoch ~= ARGV[5] then
  return redis.error_reply('AIVADEPOCH ' .. (epoch or ''))
end
local floor = tonumber(redis.call('HGET', meta, 'floor') or '0')
local deleted, more = 0, 0
if max_age > 0 then
  if now <= 0 then now = now_ms() end
  local cutoff = now - max_age
  local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
  if #first > 0 and tonumber(first[1][2][2]) < cutoff then
    -- the newest entry stored before cutoff; t never decreases along the stream
    local lo = seq_of(first[1][1])
    local hi = tonumber(redis.call('HGET', meta, 'seq') or '0')
    while lo < hi do
      local mid = math.floor((lo + hi + 1) / 2)
      local e = redis.call('XRANGE', stream, string.format('%d', mid), '+', 'COUNT', 1)
      if #e > 0 and tonumber(e[1][2][2]) < cutoff then lo = seq_of(e[1][1]) else hi = mid - 1 end
    end
    local limit = seq_of(first[1][1]) + budget - 1
    if lo > limit then lo = limit; more = 1 end
    deleted = deleted + redis.call('XTRIM', stream, 'MINID', string.format('%d', lo + 1))
  end
end
if max_messages > 0 then
  local n = redis.call('XLEN', stream)
  if n > max_messages then
    local k = n - max_messages
    if k > budget - deleted then k = budget - deleted; more = 1 end
    if k > 0 then
      deleted = deleted + redis.call('XTRIM', stream, 'MAXLEN', n - k)
    end
  end
end
if deleted > 0 then
  local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
  local new_floor
  if #first > 0 then
    new_floor = seq_of(first[1][1]) - 1
  else
    new_floor = tonumber(redis.call('HGET', meta, 'seq') or '0')
  end
  if new_floor > floor then
    floor = new_floor
    redis.call('HSET', meta, 'floor', string.format('%d', floor))
  end
  redis.call('ZREMRANGEBYSCORE', ids, '-inf', string.format('%d', floor))
end
return {deleted, floor, more}
"""

#: KEYS nodes, node-expiry. ARGV name, info JSON, ttl_ms. Returns the server time (ms).
HEARTBEAT_LUA = "#!lua\n" + _SEQ_OF + """
local now = now_ms()
local expires = now + tonumber(ARGV[3])
local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. string.format('%d', now), 'LIMIT', 0, 100)
if #gone > 0 then
  redis.call('HDEL', KEYS[1], unpack(gone))
  redis.call('ZREM', KEYS[2], unpack(gone))
end
redis.call('HSET', KEYS[1], ARGV[1], '{"last_seen_ms":' .. string.format('%d', now) .. ',"expires_ms":' ..
           string.format('%d', expires) .. ',"info":' .. ARGV[2] .. '}')
redis.call('ZADD', KEYS[2], expires, ARGV[1])
return now
"""

#: KEYS nodes, node-expiry. ARGV the most to return. Returns {now_ms, name, json, name, json…}.
LIVE_NODES_LUA = "#!lua flags=no-writes\n" + _SEQ_OF + """
local now = now_ms()
local names = redis.call('ZRANGEBYSCORE', KEYS[2], string.format('%d', now), '+inf', 'LIMIT', 0, tonumber(ARGV[1]))
local out = {now}
if #names > 0 then
  local infos = redis.call('HMGET', KEYS[1], unpack(names))
  for i, name in ipairs(names) do
    if infos[i] then
      out[#out + 1] = name
      out[#out + 1] = infos[i]
    end
  end
end
return out
"""

#: A task's changes, each one compare-and-set on the task's version, with the task's events
#: appended to the log in the same atomic step: a task ends once however many nodes race to
#: end it, and its end is in the history exactly when it is in the task book.
#: KEYS meta, stream, ids, records, versions, open, running, ended, dlq.
#: ARGV expected epoch, the newest seq the caller has seen, how many ended records to keep,
#: how many dead letters to keep (the stream is trimmed to it, the oldest going), then per
#: change: task_id, expected version ('' = a new task), record JSON, open ('+' add, '-' remove
#: and count as ended, '=' keep), owner (node name, '' none, '=' keep),
#: dead letter ('' none, '+JSON' add, '-ID' take: the change happens only if it was there),
#: the key of the task's group index ('' none: a task queued with '+' is added to it; a
#: group index lives 7 days after its last task was queued), the number of events n, then
#: n × (message_id, type, envelope JSON).
#: Returns per change its new version, or the current version negated when the CAS failed
#: (0: no such task).
TASK_CHANGE_LUA = "#!lua\n" + _LOG_FNS + """
local meta, stream, ids, records, versions = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local open, running, ended, dlq = KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local err = log_check(meta, ARGV[1], ARGV[2])
if err then
  return redis.error_reply(err)
end
local kept, letters_kept = tonumber(ARGV[3]), ARGV[4]
local t, last_t = log_clock(meta)
local ts = string.format('%d', t)
local out = {}
local stored = 0
local i = 5
while i <= #ARGV do
  local id, expected, record = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local open_op, owner, letter, group = ARGV[i + 3], ARGV[i + 4], ARGV[i + 5], ARGV[i + 6]
  local first = i + 8
  i = first + 3 * tonumber(ARGV[i + 7])
  local current = tonumber(redis.call('HGET', versions, id) or '0')
  local ok
  if expected == '' then ok = current == 0 else ok = current > 0 and tonumber(expected) == current end
  if ok and string.sub(letter, 1, 1) == '-' then
    ok = redis.call('XDEL', dlq, string.sub(letter, 2) .. '-0') == 1
  end
  if ok then
    current = current + 1
    redis.call('HSET', versions, id, string.format('%d', current))
    redis.call('HSET', records, id, record)
    if open_op == '+' then
      redis.call('ZADD', open, t, id)
      redis.call('ZREM', ended, id)
      if group ~= '' then
        redis.call('ZADD', group, 'NX', t, id)
        redis.call('PEXPIRE', group, 604800000)
      end
    elseif open_op == '-' then
      redis.call('ZREM', open, id)
      redis.call('ZADD', ended, t, id)
    end
    if owner == '' then
      redis.call('HDEL', running, id)
    elseif owner ~= '=' then
      redis.call('HSET', running, id, owner)
    end
    if string.sub(letter, 1, 1) == '+' then
      local letter_id = redis.call('HINCRBY', meta, 'dlq', 1)
      redis.call('XADD', dlq, 'MAXLEN', '=', letters_kept, string.format('%d-0', letter_id), 'd', string.sub(letter, 2))
    end
    for j = first, i - 1, 3 do
      if log_add(meta, stream, ids, ts, ARGV[j], ARGV[j + 1], ARGV[j + 2]) > 0 then stored = stored + 1 end
    end
    out[#out + 1] = current
  else
    out[#out + 1] = -current
  end
end
if stored > 0 then
  log_stored(meta, t, last_t)
end
-- ended tasks beyond what is kept: the oldest go, a few per call (each call stays short)
local over = redis.call('ZCARD', ended) - kept
if over > 0 then
  local gone = redis.call('ZRANGE', ended, 0, math.min(over, 100) - 1)
  redis.call('ZREM', ended, unpack(gone))
  redis.call('HDEL', records, unpack(gone))
  redis.call('HDEL', versions, unpack(gone))
end
return out
"""

#: KEYS meta, dlq. ARGV the dead letter's JSON, how many letters to keep (the oldest go). Returns its id.
DEAD_LETTER_ADD_LUA = """#!lua
local letter_id = redis.call('HINCRBY', KEYS[1], 'dlq', 1)
redis.call('XADD', KEYS[2], 'MAXLEN', '=', ARGV[2], string.format('%d-0', letter_id), 'd', ARGV[1])
return letter_id
"""
