-- group.py: renew this consumer's claim on entries it still owns.
-- KEYS[1]  the stream
-- ARGV[1]  the group, ARGV[2] this consumer's name
-- ARGV[3..] pairs: entry id, the delivery count it must have afterwards
-- Returns per entry: its delivery count after the call; -1 when another
-- consumer owns it now; -2 when it is not pending at all (acked meanwhile).
-- The count is set, not added to, so a call repeated after a lost reply
-- changes nothing, and an own entry that XAUTOCLAIM counted once more gets
-- its true count back.
local out = {}
for i = 3, #ARGV, 2 do
  local id, count = ARGV[i], ARGV[i + 1]
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)[1]
  if not p then
    out[#out + 1] = -2
  elseif p[2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'RETRYCOUNT', count, 'JUSTID')
    out[#out + 1] = tonumber(count)
  else
    out[#out + 1] = -1
  end
end
return out
