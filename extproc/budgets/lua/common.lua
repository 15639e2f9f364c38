-- Shared helpers, prepended to every script by store.py.
-- A counter is two keys: a HASH (spent | b:<bucket> sums, reserved, r:<rid> live lease amounts,
-- x:<rid> tombstones of leases that expired into a charge, m:<rid> the lease's attribution meta,
-- lo) and a ZSET scored by expiry: <rid> for a live lease, x:<rid> for a tombstone.
-- All amounts are integer nano-USD. Time is Redis's own clock (TIME) unless the caller passes
-- one (tests with a fake clock): every gateway replica then agrees on when a lease expires.

local TOMB_TTL = 86400  -- how long an expired lease's tombstone waits for a late settle (seconds)
local USAGE_TTL = 400 * 86400  -- a day's usage rollup, as extproc/usage.py RETENTION_DAYS

local function I(x)
  -- integers as plain digits: Lua would print 1e15 as "1e+15", which HINCRBY rejects
  return string.format('%d', x)
end

local function num(v)
  return tonumber(v or '0') or 0
end

local function clock(arg)
  if arg ~= nil and arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

local function usd(a)
  -- nano-USD as a decimal dollar string, exact
  local sign = ''
  if a < 0 then sign, a = '-', -a end
  return string.format('%s%d.%09d', sign, math.floor(a / 1000000000), a % 1000000000)
end

-- Keep a counter's key until its window can no longer be asked for. A calendar counter's keys
-- name their period, so the first expiry set (the period's end plus the grace) stands and later
-- calls leave it: a TTL read is not written to the AOF, an EXPIRE is (as a PEXPIREAT), and every
-- reserve and settle set two per counter (measured 2026-12-04: 8.9 PEXPIREATs, 1,063 of the AOF's
-- 5,735 bytes per forwarded request). A rolling counter's expiry slides with every call.
-- `expire_once`: an expiry for a key that has none (also a day's usage rollup key), else nothing.
local function expire_once(key, ttl)
  if redis.call('TTL', key) < 0 then redis.call('EXPIRE', key, ttl) end
end

local function keep(key, c, ttl)
  if c.nb ~= 0 then redis.call('EXPIRE', key, ttl) else expire_once(key, ttl) end
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

-- c = {now, nb, bs}: a counter's window (nb = 0: calendar; else nb buckets of bs seconds).
local function bucket(c)
  return math.floor(c.now / c.bs)
end

-- Add `amount` (may be negative: a late settle below the charged reservation) to settled spend.
local function add_spent(h, c, amount)
  if amount == 0 then return end
  if c.nb == 0 then
    redis.call('HINCRBY', h, 'spent', I(amount))
  else
    local idx = bucket(c)
    prune(h, idx - c.nb + 1)
    redis.call('HINCRBY', h, 'b:' .. I(idx), I(amount))
  end
end

-- meta = "usage_key \n stream_key \n stream_maxlen \n min_id_age_ms \n tuple \n record-without-closing-brace"
local function split_meta(meta)
  local parts, start = {}, 1
  for _ = 1, 5 do
    local i = string.find(meta, '\n', start, true)
    if i == nil then return nil end
    parts[#parts + 1] = string.sub(meta, start, i - 1)
    start = i + 1
  end
  parts[6] = string.sub(meta, start)
  return parts
end

local function append_record(skey, maxlen, age_ms, now, record)
  redis.call('XADD', skey, 'MAXLEN', '~', maxlen, '*', 'record', record)
  if tonumber(age_ms) > 0 then
    redis.call('XTRIM', skey, 'MINID', '~', I(math.floor(now * 1000) - tonumber(age_ms)))
  end
end

-- Roll an expiry's charge into (sign 1) or back out of (sign -1) the day's usage, from the lease's
-- meta on its first counter; returns the meta's parts, or nil when this counter holds none.
local function rollup_expiry(h, rid, sign, amount)
  local meta = redis.call('HGET', h, 'm:' .. rid)
  if not meta then return nil end
  local m = split_meta(meta)
  if m == nil then return nil end
  redis.call('HINCRBY', m[1], 'requests|' .. m[5], sign)
  redis.call('HINCRBY', m[1], 'cost_nusd|' .. m[5], I(sign * amount))
  expire_once(m[1], USAGE_TTL)
  return m
end

-- A lease expired without a settle (its gateway died or lost Redis): charge the reservation, as
-- the provider may have served it, and record that, once, from the counter that holds its meta.
local function expire_into_charge(h, c, rid, amount)
  add_spent(h, c, amount)
  redis.call('HSET', h, 'x:' .. rid, I(amount))
  redis.call('ZADD', c.z, c.now + TOMB_TTL, 'x:' .. rid)
  local m = rollup_expiry(h, rid, 1, amount)
  if m == nil then return end
  local record = m[6] .. ',"settlement":"lease_expired","end":"lease_expired",' ..
    '"estimate":"reservation","complete":false,"cost_nusd":' .. I(amount) .. ',"cost_usd":' .. usd(amount) .. '}'
  append_record(m[2], m[3], m[4], c.now, record)
  -- and for the exporters, which copy it to the record files (extproc/app.py export_expired)
  redis.call('XADD', m[2] .. ':expired', 'MAXLEN', '~', 100000, '*', 'record', record)
end

-- Expired entries of the lease zset: live leases become charges, old tombstones go.
local function purge(h, c)
  local z, now = c.z, c.now
  local expired = redis.call('ZRANGEBYSCORE', z, '-inf', now, 'LIMIT', 0, 500)
  if #expired == 0 then return end
  local freed = 0
  for _, rid in ipairs(expired) do
    redis.call('ZREM', z, rid)
    if string.sub(rid, 1, 2) == 'x:' then
      redis.call('HDEL', h, rid, 'm:' .. string.sub(rid, 3))
    else
      local f = 'r:' .. rid
      local a = num(redis.call('HGET', h, f))
      if redis.call('HDEL', h, f) == 1 then
        freed = freed + a
        expire_into_charge(h, c, rid, a)
      end
    end
  end
  if freed ~= 0 then redis.call('HINCRBY', h, 'reserved', I(-freed)) end
end

-- Take request `rid` off a counter. Returns its state there: 'lease' (live; amount held),
-- 'expired' (its lease expired into a charge of amount), or 'none' (already settled/released).
local function take(h, c, rid)
  local f = 'r:' .. rid
  local a = redis.call('HGET', h, f)
  if a then
    redis.call('HDEL', h, f)
    a = num(a)
    if a ~= 0 then redis.call('HINCRBY', h, 'reserved', I(-a)) end
    redis.call('ZREM', c.z, rid)
    return 'lease', a
  end
  local t = redis.call('HGET', h, 'x:' .. rid)
  if t then
    redis.call('HDEL', h, 'x:' .. rid)
    redis.call('ZREM', c.z, 'x:' .. rid)
    return 'expired', num(t)
  end
  return 'none', 0
end

-- Settled spend of a counter: calendar = `spent`; rolling = sum of the window's buckets (also returned, oldest first).
local function spent_of(h, c)
  if c.nb == 0 then
    return num(redis.call('HGET', h, 'spent')), {}
  end
  local idx = bucket(c)
  prune(h, idx - c.nb + 1)
  local fields = {}
  for i = idx - c.nb + 1, idx do fields[#fields + 1] = 'b:' .. I(i) end
  local vals = redis.call('HMGET', h, unpack(fields))
  local total, out = 0, {}
  for i, v in ipairs(vals) do
    local a = num(v)
    total = total + a
    out[i] = a
  end
  return total, out
end

-- A lease that had expired into a charge is settled or released after all: take its expiry
-- charge back out of the rollup (the counter's spend is corrected by the caller).
local function unexpire_rollup(h, rid, amount)
  rollup_expiry(h, rid, -1, amount)
end
