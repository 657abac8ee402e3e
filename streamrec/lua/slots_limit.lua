-- semaphore.py: set or drop one business's own limit; wake what a raised one lets run.
-- KEYS, ARGV[1..7 + nb]: the layout of slots_prelude.lua, with the one business (j = 1)
-- ARGV[8]  its new limit, or '' to fall back to the default
-- Returns how many parked entries were woken.
local b = business(1)
if ARGV[rest] == '' then
  redis.call('HDEL', limits, b.name)
else
  redis.call('HSET', limits, b.name, ARGV[rest])
  register(b)
end
return settle(b)
