-- Shared helpers, prepended to every script by store.py.
-- A counter is two keys: a HASH (spent | b:<bucket> sums, reserved, r:<request_id> lease amounts, lo)
-- and a ZSET of request_id scored by lease expiry. All amounts are integer nano-USD.

local function I(x)
  -- integers as plain digits: Lua would print 1e15 as "1e+15", which HINCRBY rejects
  return string.format('%d', x)
end

local function num(v)
  return tonumber(v or '0') or 0
end

-- Drop leases that expired at or before `now` and take their amounts out of `reserved`.
local function purge(h, z, now)
  local expired = redis.call('ZRANGEBYSCORE', z, '-inf', now, 'LIMIT', 0, 500)
  if #expired == 0 then return end
  local freed = 0
  for _, rid in ipairs(expired) do
    local f = 'r:' .. rid
    freed = freed + num(redis.call('HGET', h, f))
    redis.call('HDEL', h, f)
    redis.call('ZREM', z, rid)
  end
  if freed ~= 0 then redis.call('HINCRBY', h, 'reserved', I(-freed)) end
end

-- Remove request `rid`'s lease (if still there); returns the amount it held.
local function drop_lease(h, z, rid)
  local f = 'r:' .. rid
  local a = num(redis.call('HGET', h, f))
  if redis.call('HDEL', h, f) == 1 and a ~= 0 then
    redis.call('HINCRBY', h, 'reserved', I(-a))
  end
  redis.call('ZREM', z, rid)
  return a
end

-- Rolling counters: delete bucket fields older than `first`; `lo` remembers the oldest kept bucket.
local function prune(h, first)
  local lo = tonumber(redis.call('HGET', h, 'lo') or '')
  if lo ~= nil and lo < first then
    if first - lo <= 64 then
      for i = lo, first - 1 do redis.call('HDEL', h, 'b:' .. I(i)) end
    else
      for _, k in ipairs(redis.call('HKEYS', h)) do
        if string.sub(k, 1, 2) == 'b:' and (tonumber(string.sub(k, 3)) or first) < first then
          redis.call('HDEL', h, k)
        end
      end
    end
  end
  if lo == nil or lo < first then redis.call('HSET', h, 'lo', I(first)) end
end

-- Settled spend of a counter: calendar = `spent`; rolling = sum of buckets idx-nb+1..idx (also returned, oldest first).
local function spent_of(h, idx, nb)
  if nb == 0 then
    return num(redis.call('HGET', h, 'spent')), {}
  end
  prune(h, idx - nb + 1)
  local fields = {}
  for i = idx - nb + 1, idx do fields[#fields + 1] = 'b:' .. I(i) end
  local vals = redis.call('HMGET', h, unpack(fields))
  local total, out = 0, {}
  for i, v in ipairs(vals) do
    local a = num(v)
    total = total + a
    out[i] = a
  end
  return total, out
end
