-- Reserve an amount on every counter, all or nothing, as a lease of `lease_seconds` on Redis's clock.
-- A budget counter's amount is the request's worst-case cost (nano-USD); a rate limit's is 1 (requests)
-- or the worst-case tokens: all are held, aged and expired the same way.
-- KEYS: h1, z1, h2, z2, ...
-- ARGV: now ('' = Redis TIME), request_id, lease_seconds, n, meta ('' = none; kept on the first
--       counter, a budget's, so an expired lease can still be recorded), then per counter: limit,
--       enforce(1|0), ttl, nb, bs, until, amount   (`limit` and `until`, the calendar period's end or ''
--       for rolling, are kept in the hash for `tollgate budgets`)
-- Returns {ok, {{spent, reserved, over, buckets}, ...}, now}: the state before this reservation
-- (excluding an earlier lease of the same request_id, which is replaced), over = 1 if
-- spent + reserved + amount > limit; buckets (rolling only) for over-limit counters, for retry_after.
local now, rid, lease, n, meta = clock(ARGV[1]), ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local ok, out, prev, cs, amt = 1, {}, {}, {}, {}
for i = 1, n do
  local h, a = KEYS[2 * i - 1], 5 + (i - 1) * 7
  local c = {z = KEYS[2 * i], now = now, nb = tonumber(ARGV[a + 4]), bs = tonumber(ARGV[a + 5])}
  cs[i] = c
  local limit, enforce = tonumber(ARGV[a + 1]), ARGV[a + 2] == '1'
  amt[i] = tonumber(ARGV[a + 7])
  purge(h, c)
  local spent, buckets = spent_of(h, c)
  prev[i] = num(redis.call('HGET', h, 'r:' .. rid))
  local reserved = num(redis.call('HGET', h, 'reserved')) - prev[i]
  local over = 0
  if spent + reserved + amt[i] > limit then
    over = 1
    if enforce then ok = 0 end
  else
    buckets = {}
  end
  out[i] = {I(spent), I(reserved), over, buckets}
end
if ok == 1 then
  for i = 1, n do
    local h, a = KEYS[2 * i - 1], 5 + (i - 1) * 7
    local ttl = ARGV[a + 3]
    local cost = amt[i]
    redis.call('HSET', h, 'r:' .. rid, I(cost), 'limit', ARGV[a + 1], 'until', ARGV[a + 6])
    if i == 1 and meta ~= '' then redis.call('HSET', h, 'm:' .. rid, meta) end
    if cost ~= prev[i] then redis.call('HINCRBY', h, 'reserved', I(cost - prev[i])) end
    redis.call('ZADD', cs[i].z, now + lease, rid)
    keep(h, cs[i], ttl)
    keep(cs[i].z, cs[i], ttl)
  end
end
return {ok, out, tostring(now)}
