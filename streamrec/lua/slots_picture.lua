-- semaphore.py: the slots of every business that holds slots, has parked entries or a
-- limit of its own, in one read-only call.
-- KEYS, ARGV[1..7 + nb]: the layout of slots_prelude.lua, with no businesses or entries
-- Returns per business: {name, live leases, its own limit or '', parked entries}.
local own = {}
local pairs_ = redis.call('HGETALL', limits)
for k = 1, #pairs_, 2 do own[pairs_[k]] = pairs_[k + 1] end
local names, seen = {}, {}
local function add(found)
  for _, name in ipairs(found) do
    if not seen[name] then
      seen[name] = true
      names[#names + 1] = name
    end
  end
end
add(redis.call('SMEMBERS', registry))
for name in pairs(own) do add({name}) end
add(redis.call('SMEMBERS', legacy))
local rows = {}
for _, name in ipairs(names) do
  local b = named(name)
  rows[#rows + 1] = {name, redis.call('ZCOUNT', b.slots, now, '+inf'), own[name] or '', queued(b)}
end
return rows
