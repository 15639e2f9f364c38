-- Drop request_id's leases without charging anything (upstream failed, no usage).
-- KEYS: h1, z1, ...   ARGV: now, request_id, n      Returns the number of leases that were still live.
local now, rid, n = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local live = 0
for i = 1, n do
  local h, z = KEYS[2 * i - 1], KEYS[2 * i]
  purge(h, z, now)
  if redis.call('HEXISTS', h, 'r:' .. rid) == 1 then live = live + 1 end
  drop_lease(h, z, rid)
end
return live
