-- Current state of counters (purging expired leases on the way), for status queries.
-- KEYS: h1, z1, ...   ARGV: now ('' = Redis TIME), n, then per counter: nb, bs
-- Returns {{spent, reserved, buckets}, ...}
local now, n = clock(ARGV[1]), tonumber(ARGV[2])
local out = {}
for i = 1, n do
  local h, a = KEYS[2 * i - 1], 2 + (i - 1) * 2
  local c = {z = KEYS[2 * i], now = now, nb = tonumber(ARGV[a + 1]), bs = tonumber(ARGV[a + 2])}
  purge(h, c)
  local spent, buckets = spent_of(h, c)
  out[i] = {I(spent), I(num(redis.call('HGET', h, 'reserved'))), buckets}
end
return out
