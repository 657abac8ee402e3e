-- semaphore.py: take slots for a batch of entries read from the stream.
-- KEYS, ARGV[1..7 + nb]: the layout of slots_prelude.lua
-- Entries: "j id before front" each: before = the deliveries the entry carries if it
--   parks (this one did not run); front = 1 to park ahead of its business's line (it was
--   in line before the entries waiting now: woken or reclaimed)
-- Returns per entry: 1 run (slot held), 0 parked, -1 no longer in the stream.

-- Move an entry from the stream (and the group's pending list) to its business's line.
local function park(b, id, before, front)
  local entry = redis.call('XRANGE', stream, id, id)[1]
  if not entry then return -1 end
  local fields, read = {}, entry[2]
  for k = 1, #read, 2 do
    -- A wake adds these again, with the counts of the time.
    if read[k] ~= 'prior_deliveries' and read[k] ~= 'woken' then
      fields[#fields + 1] = read[k]
      fields[#fields + 1] = read[k + 1]
    end
  end
  local item = cjson.encode({f = fields, d = before, id = id, at = now})
  b.queued = queued(b) + 1
  redis.call(front and 'LPUSH' or 'RPUSH', b.parked, item)
  register(b)
  redis.call('XACK', stream, group, id)
  redis.call('XDEL', stream, id)
  return 0
end

local out = {}
for j, id, before, front in string.gmatch(entries, '(%S+) (%S+) (%S+) (%S+)') do
  local b = business(tonumber(j))
  local ahead = front == '1'
  touch(b)
  if redis.call('ZSCORE', b.slots, id) then
    take(b, id)  -- its slot was reserved when it was woken
    out[#out + 1] = 1
  elseif held(b) < limit(b) and (ahead or queued(b) == 0) then
    take(b, id)
    register(b)
    out[#out + 1] = 1
  else
    out[#out + 1] = park(b, id, tonumber(before), ahead)
  end
end
-- Entries parked only because others wait move the line on by the free slots.
settle_touched()
return out
