-- Drop request_id's leases without charging anything (it never reached the provider, or the
-- provider answered an error that costs nothing).
-- KEYS: h1, z1, ...   ARGV: now ('' = Redis TIME), request_id, n, then per counter: nb, bs
-- Returns the number of leases that were still live; one that had expired into a charge is refunded.
local now, rid, n = clock(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local live = 0
for i = 1, n do
  local h, a = KEYS[2 * i - 1], 3 + (i - 1) * 2
  local c = {z = KEYS[2 * i], now = now, nb = tonumber(ARGV[a + 1]), bs = tonumber(ARGV[a + 2])}
  purge(h, c)
  local state, amount = take(h, c, rid)
  if state == 'lease' then
    live = live + 1
  elseif state == 'expired' then  -- charged by a purge before this release came: give it back
    add_spent(h, c, -amount)
    if i == 1 then unexpire_rollup(h, rid, amount) end
  end
  if i == 1 then redis.call('HDEL', h, 'm:' .. rid) end
end
return live
