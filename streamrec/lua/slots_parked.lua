-- semaphore.py: how many entries are parked, over every business.
-- KEYS, ARGV[1..7 + nb]: the layout of slots_prelude.lua, with no businesses or entries
-- Returns the count (businesses still in the previous version's parked set included).
local total, seen = 0, {}
for _, name in ipairs(redis.call('ZRANGE', due, 0, -1)) do
  seen[name] = true
  total = total + queued(named(name))
end
for _, name in ipairs(redis.call('SMEMBERS', legacy)) do
  if not seen[name] then total = total + queued(named(name)) end
end
return total
