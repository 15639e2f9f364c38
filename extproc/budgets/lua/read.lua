-- Current state of counters (purging expired leases on the way), for status queries.
-- KEYS: h1, z1, ...   ARGV: now, n, then per counter: idx, nb     Returns {{spent, reserved, buckets}, ...}
local now, n = tonumber(ARGV[1]), tonumber(ARGV[2])
local out = {}
for i = 1, n do
  local h, z, a = KEYS[2 * i - 1], KEYS[2 * i], 2 + (i - 1) * 2
  purge(h, z, now)
  local spent, buckets = spent_of(h, tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]))
  out[i] = {I(spent), I(num(redis.call('HGET', h, 'reserved'))), buckets}
end
return out
