-- semaphore.py: extend the leases of entries still at work.
-- KEYS, ARGV[1..7 + nb]: the layout of slots_prelude.lua
-- Entries: "j id" each, a holder at work. A lease that had run out and was dropped is
--   taken again if its business has a slot free (the entry is running: it goes first).
-- Returns the ids whose slot was lost to others.
local lost = {}
for j, id in string.gmatch(entries, '(%S+) (%S+)') do
  local b = business(tonumber(j))
  touch(b)
  if redis.call('ZSCORE', b.slots, id) or held(b) < limit(b) then
    take(b, id)
  else
    lost[#lost + 1] = id
  end
end
-- Renewed leases move the time their business's parked entries are due. (A slot freed
-- meanwhile leaves its business due now: the sweep wakes into it.)
for _, b in ipairs(touched) do index(b) end
return lost
