-- semaphore.py: free the slots of entries done with them; wake parked entries into them.
-- KEYS, ARGV[1..7 + nb]: the layout of slots_prelude.lua
-- Entries: "j id" each, a holder whose slot frees
-- ARGV[8 + nb]  1 to XACK + XDEL the entries too (they are done), else 0
-- Returns how many parked entries were woken.
local ids = {}
for j, id in string.gmatch(entries, '(%S+) (%S+)') do
  local b = business(tonumber(j))
  touch(b)
  redis.call('ZREM', b.slots, id)
  ids[#ids + 1] = id
end
if ARGV[rest] == '1' and #ids > 0 then
  redis.call('XACK', stream, group, unpack(ids))
  redis.call('XDEL', stream, unpack(ids))
end
return settle_touched()
