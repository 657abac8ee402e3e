-- deadletters.py: put dead letters back on the stream.
-- KEYS[1]  the dead-letter stream, KEYS[2] the stream,
-- KEYS[2 + i]  the replay marker of the i-th id ({ns}:replayed:<dead id>)
-- ARGV[1]  the markers' lifetime (s), ARGV[1 + i] the i-th dead-letter id
-- Returns per id the new entry id, or false when there is no such dead letter.
-- Each dead letter's original fields (its own minus error, attempts,
-- origin_id, consumer, failed_at) are XADDed and the dead letter XDELed in
-- this one call. The marker keeps the new id for a while, so a call repeated
-- after a lost reply answers the same new id and adds nothing.
-- Only a dead letter's exact id counts: XRANGE reads "5" as the range
-- 5-0..5-max and a malformed id as an error, and either would move a wrong
-- entry or only part of the batch.
local meta = {error = true, attempts = true, origin_id = true, consumer = true, failed_at = true}
local moved = {}
for i = 1, #ARGV - 1 do
  local id, marker = ARGV[i + 1], KEYS[i + 2]
  local found = redis.pcall('XRANGE', KEYS[1], id, id)
  if type(found) == 'table' and not found.err and found[1] and found[1][1] == id then
    local fields, original = found[1][2], {}
    for j = 1, #fields, 2 do
      if not meta[fields[j]] then
        original[#original + 1] = fields[j]
        original[#original + 1] = fields[j + 1]
      end
    end
    moved[i] = redis.call('XADD', KEYS[2], '*', unpack(original))
    redis.call('XDEL', KEYS[1], id)
    redis.call('SET', marker, moved[i], 'EX', ARGV[1])
  else
    moved[i] = redis.call('GET', marker)
  end
end
return moved
