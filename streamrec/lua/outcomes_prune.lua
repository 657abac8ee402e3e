-- monitor.py and tally.py: the prelude that prunes outcome counts past the hour.
-- prune_outcomes(counts, slots, slot, kept) deletes, for each slot of ``slots``
-- (the {ns}:outcome-slots sorted set) at or before ``slot - kept`` (up to 100 per
-- call), every '<outcome>:<slot>' field of ``counts`` ({ns}:outcomes), whoever
-- added it (consumers' outcomes and the webhook's answers share the slots), and
-- the slot itself. Reads the field names only when a slot is due, which is at
-- most once per slot length across all writers.
local function prune_outcomes(counts, slots, slot, kept)
  local old = redis.call('ZRANGE', slots, '-inf', slot - kept, 'BYSCORE', 'LIMIT', 0, 100)
  if #old == 0 then
    return 0
  end
  local due = {}
  for _, past in ipairs(old) do
    due[past] = true
  end
  local gone = {}
  for _, field in ipairs(redis.call('HKEYS', counts)) do
    local past = string.match(field, ':(%d+)$')
    if past and due[past] then
      gone[#gone + 1] = field
    end
  end
  for i = 1, #gone, 500 do
    redis.call('HDEL', counts, unpack(gone, i, math.min(i + 499, #gone)))
  end
  redis.call('ZREM', slots, unpack(old))
  return #old
end
