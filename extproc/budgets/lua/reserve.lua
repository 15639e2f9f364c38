-- Reserve `cost` on every counter, all or nothing.
-- KEYS: h1, z1, h2, z2, ...   ARGV: now, request_id, lease_expiry, cost, n, then per counter: limit, enforce(1|0), ttl, idx, nb, until
-- (`limit` and `until`, the calendar period's end or '' for rolling, are kept in the hash for `tollgate budgets`)
-- Returns {ok, {spent, reserved, over, buckets}, ...}: the state before this reservation (excluding an earlier
-- lease of the same request_id, which is replaced), over = 1 if spent + reserved + cost > limit.
-- buckets (rolling only) are returned for over-limit counters so the caller can compute retry_after.
local now, rid, expiry, cost, n = tonumber(ARGV[1]), ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local ok, out, prev = 1, {}, {}
for i = 1, n do
  local h, z, a = KEYS[2 * i - 1], KEYS[2 * i], 5 + (i - 1) * 6
  local limit, enforce, idx, nb = tonumber(ARGV[a + 1]), ARGV[a + 2] == '1', tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5])
  purge(h, z, now)
  local spent, buckets = spent_of(h, idx, nb)
  prev[i] = num(redis.call('HGET', h, 'r:' .. rid))
  local reserved = num(redis.call('HGET', h, 'reserved')) - prev[i]
  local over = 0
  if spent + reserved + cost > limit then
    over = 1
    if enforce then ok = 0 end
  else
    buckets = {}
  end
  out[i] = {I(spent), I(reserved), over, buckets}
end
if ok == 1 then
  for i = 1, n do
    local h, z, a = KEYS[2 * i - 1], KEYS[2 * i], 5 + (i - 1) * 6
    local ttl = ARGV[a + 3]
    redis.call('HSET', h, 'r:' .. rid, I(cost), 'limit', ARGV[a + 1], 'until', ARGV[a + 6])
    if cost ~= prev[i] then redis.call('HINCRBY', h, 'reserved', I(cost - prev[i])) end
    redis.call('ZADD', z, expiry, rid)
    redis.call('EXPIRE', h, ttl)
    redis.call('EXPIRE', z, ttl)
  end
end
return {ok, out}
