-- Replace request_id's leases by its real cost, once; with usage, roll it up and record it in the
-- same atomic call, so reports, records and budgets can never disagree.
-- Idempotent without a per-request key: a counter is charged only while it still holds the
-- request's lease, or the tombstone its lease left when it expired into a charge of the
-- reservation (then only the difference is charged, and the expiry's rollup is taken back).
-- A settle with no counters (no budget applies) uses a short-lived marker key instead.
-- KEYS: h1, z1, ..., hn, zn, then with usage: marker, usage_key, stream_key
-- ARGV: now ('' = Redis TIME), request_id, actual, n, per counter: ttl, nb, bs,
--       then usage flag (0|1) and, with 1: usage_ttl, stream_maxlen, min_id_age_ms, marker_ttl,
--       record (JSON object without its closing brace: the script adds "settlement"), m, m x (field, increment),
--       then optionally 'A' and n amounts, one per counter (rate limits settle in requests or tokens, not
--       the cost; without them, as settles queued by older gateways in an outbox, every counter gets `actual`)
-- Returns {outcome, now}: settled | settled_after_expiry | recorded | duplicate
local now, rid, actual, n = clock(ARGV[1]), ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local first_state, first_amount, first_h = 'none', 0, nil
local u = 5 + 3 * n
local tail = u + 1
if ARGV[u] == '1' then tail = u + 7 + 2 * tonumber(ARGV[u + 6]) end
local per_counter = ARGV[tail] == 'A'
for i = 1, n do
  local actual = actual
  if per_counter then actual = tonumber(ARGV[tail + i]) end
  local h, a = KEYS[2 * i - 1], 4 + (i - 1) * 3
  local c = {z = KEYS[2 * i], now = now, nb = tonumber(ARGV[a + 2]), bs = tonumber(ARGV[a + 3])}
  purge(h, c)
  local state, amount = take(h, c, rid)
  if state == 'lease' then
    add_spent(h, c, actual)
  elseif state == 'expired' then
    add_spent(h, c, actual - amount)
  end
  if i == 1 then first_state, first_amount, first_h = state, amount, h end
  keep(h, c, ARGV[a + 1])
  keep(c.z, c, ARGV[a + 1])
end
local outcome
if n == 0 then
  outcome = 'recorded'
elseif first_state == 'lease' then
  outcome = 'settled'
elseif first_state == 'expired' then
  outcome = 'settled_after_expiry'
else
  outcome = 'duplicate'
end
if ARGV[u] == '1' and outcome ~= 'duplicate' then
  local marker, ukey, skey = KEYS[2 * n + 1], KEYS[2 * n + 2], KEYS[2 * n + 3]
  if n == 0 and not redis.call('SET', marker, '1', 'NX', 'EX', ARGV[u + 4]) then
    outcome = 'duplicate'
  else
    if outcome == 'settled_after_expiry' then unexpire_rollup(first_h, rid, first_amount) end
    local m = tonumber(ARGV[u + 6])
    for j = 1, m do
      redis.call('HINCRBY', ukey, ARGV[u + 5 + 2 * j], ARGV[u + 6 + 2 * j])
    end
    if m > 0 then expire_once(ukey, ARGV[u + 1]) end  -- a day's key, as a calendar counter's
    append_record(skey, ARGV[u + 2], ARGV[u + 3], now, ARGV[u + 5] .. ',"settlement":"' .. outcome .. '"}')
  end
end
if first_h ~= nil then redis.call('HDEL', first_h, 'm:' .. rid) end
return {outcome, tostring(now)}
