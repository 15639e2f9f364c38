-- Replace request_id's leases by its real cost, once: a marker key makes a retried settle a no-op.
-- Charges even when the lease already expired (accounting is never lost).
-- KEYS: marker, h1, z1, h2, z2, ..., [usage, stream]
-- ARGV: now, request_id, actual, marker_ttl, n, then per counter: ttl, idx, nb,
--       then usage flag (0|1) and, with 1: usage_ttl, stream_maxlen, record_json, m, m x (field, increment)
-- With usage, the same call rolls the request up into the day's usage hash and appends its
-- attribution record to the stream, so reports and budgets can never disagree.
-- Returns 1 if charged, 0 if this request_id was already settled.
local now, rid, actual, marker_ttl, n = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
local first = redis.call('SET', KEYS[1], I(actual), 'NX', 'EX', marker_ttl)
for i = 1, n do
  local h, z, a = KEYS[2 * i], KEYS[2 * i + 1], 5 + (i - 1) * 3
  local ttl, idx, nb = ARGV[a + 1], tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  purge(h, z, now)
  drop_lease(h, z, rid)
  if first and actual ~= 0 then
    if nb == 0 then
      redis.call('HINCRBY', h, 'spent', I(actual))
    else
      prune(h, idx - nb + 1)
      redis.call('HINCRBY', h, 'b:' .. I(idx), I(actual))
    end
  end
  redis.call('EXPIRE', h, ttl)
  redis.call('EXPIRE', z, ttl)
end
local u = 6 + 3 * n
if ARGV[u] == '1' and first then
  local ukey, skey = KEYS[2 * n + 2], KEYS[2 * n + 3]
  local m = tonumber(ARGV[u + 4])
  for j = 1, m do
    redis.call('HINCRBY', ukey, ARGV[u + 3 + 2 * j], ARGV[u + 4 + 2 * j])
  end
  if m > 0 then redis.call('EXPIRE', ukey, ARGV[u + 1]) end
  redis.call('XADD', skey, 'MAXLEN', '~', ARGV[u + 2], '*', 'record', ARGV[u + 3])
end
if first then return 1 end
return 0
