-- producer.py: add recording events to the stream, once per RecordingSid.
-- KEYS[1]  the stream, KEYS[1 + i] the dedupe marker of the i-th event
--          ({ns}:seen:<RecordingSid>)
-- ARGV[1]  the markers' lifetime (s)
-- ARGV[2]  '1' to rewrite the marker of an event already seen (same value,
--          same expiry), '0' not to: see below
-- ARGV[2 + i] the i-th event's fields as one JSON array [name, value, ...]
-- Returns two values per event: 1 and its new entry id; 0 and the id its
-- recording was first added as; or -1 and the error Redis gave for it (its
-- marker holds the wrong type, Redis is out of memory), when nothing of that
-- event was written. One event's error does not fail the others, whose
-- writes stand.
-- Safe to repeat: a repeated call finds the markers and answers 0.
--
-- Why rewrite a marker: a WAIT after this call counts replicas up to the
-- calling connection's last write, and since Redis 7.2 a call that writes
-- nothing leaves that point where it was (0 on a new connection). A duplicate
-- is answered 2xx only once its first add is confirmed too; rewriting its
-- marker is a write, so the WAIT then covers everything before it, that add
-- included, whichever connection made it.
local function add(stream, marker, ttl, rewrite, fields)
  local seen = redis.pcall('GET', marker)
  if type(seen) == 'table' then
    return -1, seen.err
  end
  if seen then
    if rewrite then
      local done = redis.pcall('SET', marker, seen, 'KEEPTTL')
      if type(done) == 'table' and done.err then
        return -1, done.err
      end
    end
    return 0, seen
  end
  local id = redis.pcall('XADD', stream, '*', unpack(cjson.decode(fields)))
  if type(id) == 'table' then
    return -1, id.err
  end
  redis.call('SET', marker, id, 'EX', ttl)
  return 1, id
end

local rewrite = ARGV[2] == '1'
local out = {}
for k = 2, #KEYS do
  local outcome, value = add(KEYS[1], KEYS[k], ARGV[1], rewrite, ARGV[k + 1])
  out[#out + 1] = outcome
  out[#out + 1] = value
end
return out
