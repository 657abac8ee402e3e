-- semaphore.py: wake the parked entries of businesses due (a lease ran out, a limit rose).
-- KEYS, ARGV[1..7 + nb]: the layout of slots_prelude.lua, with no businesses or entries
-- ARGV[8]  the sweep period (ms): one sweep per period over every consumer (the lock)
-- Returns how many parked entries were woken (0 too when another consumer swept this period).

-- The previous version listed the businesses with parked entries in a plain set:
-- index them as due now, once.
if redis.call('EXISTS', legacy) == 1 then
  for _, name in ipairs(redis.call('SMEMBERS', legacy)) do
    redis.call('ZADD', due, 0, name)
    redis.call('SADD', registry, name)
  end
  redis.call('DEL', legacy)
end
local names = redis.call('ZRANGEBYSCORE', due, '-inf', now)
if #names == 0 or not redis.call('SET', lock, '1', 'NX', 'PX', ARGV[rest]) then
  return 0
end
local woken = 0
for _, name in ipairs(names) do woken = woken + settle(named(name)) end
return woken
