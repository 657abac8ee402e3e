-- producer.py: add recording events to the stream, once per RecordingSid.
-- KEYS[1]  the stream, KEYS[1 + i] the dedupe marker of the i-th event
--          ({ns}:seen:<RecordingSid>)
-- ARGV[1]  the markers' lifetime (s), ARGV[1 + i] the i-th event's fields as
--          one JSON array [name, value, ...]
-- Returns two values per event: 1 and its new entry id; 0 and the id its
-- recording was first added as; or -1 and the error Redis gave for it (its
-- marker holds the wrong type, Redis is out of memory), when nothing of that
-- event was written. One event's error does not fail the others, whose
-- writes stand.
-- Safe to repeat: a repeated call finds the markers and answers 0.
local function add(stream, marker, ttl, fields)
  local seen = redis.pcall('GET', marker)
  if type(seen) == 'table' then
    return -1, seen.err
  end
  if seen then
    return 0, seen
  end
  local id = redis.pcall('XADD', stream, '*', unpack(cjson.decode(fields)))
  if type(id) == 'table' then
    return -1, id.err
  end
  redis.call('SET', marker, id, 'EX', ttl)
  return 1, id
end

local out = {}
for k = 2, #KEYS do
  local outcome, value = add(KEYS[1], KEYS[k], ARGV[1], ARGV[k])
  out[#out + 1] = outcome
  out[#out + 1] = value
end
return out
