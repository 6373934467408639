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

#: KEYS meta, stream, ids. ARGV expected epoch, the newest seq the caller has seen, then
#: (message_id, type, envelope JSON) per message.
#: Returns per message its seq, negated when it is a duplicate (the original's seq).
APPEND_LUA = """#!lua
local meta, stream, ids = KEYS[1], KEYS[2], KEYS[3]
local epoch = redis.call('HGET', meta, 'epoch')
if epoch ~= ARGV[1] then
  return redis.error_reply('AIVADEPOCH ' .. (epoch or ''))
end
local counter = tonumber(redis.call('HGET', meta, 'seq') or '0')
if counter < tonumber(ARGV[2]) then
  return redis.error_reply('AIVADREWOUND ' .. string.format('%d', counter))
end
if (#ARGV - 2) % 3 ~= 0 then
  return redis.error_reply('ERR aivad append: arguments must come in threes')
end
local tm = redis.call('TIME')
local t = tonumber(tm[1]) * 1000 + math.floor(tonumber(tm[2]) / 1000)
local last_t = tonumber(redis.call('HGET', meta, 't') or '0')
if t < last_t then t = last_t end
local ts = string.format('%d', t)
local out = {}
local stored = 0
for i = 3, #ARGV, 3 do
  local mid = ARGV[i]
  local known = redis.call('ZSCORE', ids, mid)
  if known then
    out[#out + 1] = -tonumber(known)
  else
    local seq = redis.call('HINCRBY', meta, 'seq', 1)
    redis.call('XADD', stream, string.format('%d-0', seq), 't', ts, 'type', ARGV[i + 1], 'd', ARGV[i + 2])
    redis.call('ZADD', ids, seq, mid)
    out[#out + 1] = seq
    stored = stored + 1
  end
end
if stored > 0 and t ~= last_t then
  redis.call('HSET', meta, 't', ts)
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
