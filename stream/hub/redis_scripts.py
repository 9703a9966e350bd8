"""What runs inside Redis: the Lua scripts of the Redis broker and of provider leases. Each is
one atomic step, so what it checks still holds when it writes.

Keys (all under ``stream:``):

    stream:epoch            the hub's epoch: created once (SET NX); only losing Redis's data loses it
    stream:events           one Redis Stream of every event in accept order: fields e (epoch),
                            n (the entry's number), t (topic), d (data JSON), and p on a primed
                            value (a retained value that is not an event)
    stream:count            how many entries were ever added: numbers them, so a reader sees a hole
    stream:retained         hash topic -> "<entry id> <-|p> <data JSON>", written with the XADD,
                            so a snapshot and the stream never disagree
    stream:rate:<who>       a publisher's token bucket (hash tokens, stamp): its publish rate
                            holds for the whole hub, whichever node it publishes on
    stream:lease:<provider> the node polling it, with a TTL
    stream:fence:<provider> "<n> <node>", n incremented each time a node takes the lease: the
                            holder's publishes and saves carry the value it got and are refused
                            once it moved on
    stream:poller:<provider> hash: state (dedup memory, validators), status (the holder's last)
"""

from __future__ import annotations

__all__ = ["HOLD", "PREFIX", "PUBLISH", "RELEASE", "SAVE"]

PREFIX = "stream:"

# KEYS: events, retained, epoch, count, fence, rate bucket.
# ARGV: epoch, maxlen, ttl ms, prime ("1": only topics without a retained value, as primed
# values), fence token ("": none), rate, burst, cost ("": no charge), deadline (Redis time in
# ms, "": none), then topic, data pairs.
# Errors: STREAMLATE (run after its deadline: the caller has given up on it, and answered its
# client that the publish failed), STREAMEPOCH (Redis lost its data), STREAMFENCED (the lease
# moved on), STREAMRATE <seconds> (over the publisher's rate). Returns the entry ids ('' for a
# topic already primed).
PUBLISH = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + tonumber(now[2]) / 1000
if ARGV[9] ~= '' and now_ms > tonumber(ARGV[9]) then
  return redis.error_reply('STREAMLATE past its deadline')
end
if redis.call('GET', KEYS[3]) ~= ARGV[1] then
  return redis.error_reply('STREAMEPOCH the hub epoch changed')
end
if ARGV[5] ~= '' and redis.call('GET', KEYS[5]) ~= ARGV[5] then
  return redis.error_reply('STREAMFENCED the lease passed to another node')
end
if ARGV[8] ~= '' then
  local rate, burst, cost = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
  local bucket = redis.call('HMGET', KEYS[6], 'tokens', 'stamp')
  local tokens = tonumber(bucket[1]) or burst
  local stamp = tonumber(bucket[2]) or now_ms
  tokens = math.min(burst, tokens + math.max(0, now_ms - stamp) / 1000 * rate)
  if tokens < cost then
    return redis.error_reply('STREAMRATE ' .. string.format('%.3f', (cost - tokens) / rate))
  end
  redis.call('HSET', KEYS[6], 'tokens', string.format('%.6f', tokens - cost), 'stamp', string.format('%.3f', now_ms))
  redis.call('PEXPIRE', KEYS[6], math.ceil(burst / rate * 1000) + 1000)
end
local prime = ARGV[4] == '1'
local ids = {}
for i = 10, #ARGV, 2 do
  local topic, data = ARGV[i], ARGV[i + 1]
  if prime and redis.call('HEXISTS', KEYS[2], topic) == 1 then
    ids[#ids + 1] = ''
  else
    local id
    local n = redis.call('INCR', KEYS[4])
    if prime then
      id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'e', ARGV[1], 'n', n, 't', topic, 'd', data, 'p', '1')
    else
      id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'e', ARGV[1], 'n', n, 't', topic, 'd', data)
    end
    redis.call('HSET', KEYS[2], topic, id .. (prime and ' p ' or ' - ') .. data)
    ids[#ids + 1] = id
  end
end
local ttl = tonumber(ARGV[3])
if ttl > 0 then
  redis.call('XTRIM', KEYS[1], 'MINID', '~', string.format('%d', math.floor(now_ms) - ttl))
end
return ids
"""

# KEYS: lease, fence, poller hash. ARGV: node, ttl ms.
# Renews the lease if this node holds it, takes it (with a new fence) if nobody does. Returns
# {holder, fence} when this node holds it, else {holder, the holder's last saved status or false}.
# A fence is "<n> <node>", n one more than the last: after Redis lost its data (n from 1 again),
# a node that took a lease before cannot hold the same fence as the node that took it since.
# A holder whose fence is gone (deleted, evicted) gets a new one: its publishes would all be refused.
HOLD = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  local fence = redis.call('GET', KEYS[2])
  if fence then
    return {holder, fence}
  end
elseif holder then
  return {holder, redis.call('HGET', KEYS[3], 'status')}
else
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
local last = redis.call('GET', KEYS[2])
local fence = tostring((last and tonumber(string.match(last, '^%d+')) or 0) + 1) .. ' ' .. ARGV[1]
redis.call('SET', KEYS[2], fence)
return {ARGV[1], fence}
"""

# KEYS: lease. ARGV: node. Gives the lease up only if this node still holds it.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# KEYS: poller hash, fence. ARGV: fence token, field, value. Saves only while the fence is the
# caller's: a node whose lease passed on cannot overwrite what the new holder saved.
SAVE = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
return 1
"""
