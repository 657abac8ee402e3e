-- deadletters.py: move an entry that failed for good to the dead-letter stream.
-- KEYS[1]  the stream, KEYS[2] the dead-letter stream,
-- KEYS[3]  the entry's move marker ({ns}:dead-moved:<entry id>)
-- ARGV[1]  the group, ARGV[2] the entry id, ARGV[3] the consumer moving it,
-- ARGV[4]  the marker's lifetime (s),
-- ARGV[5]  the dead letter's fields as one JSON array [name, value, ...]
-- Returns 1 when this consumer moved the entry: now, or in an earlier run of
-- the same call whose reply was lost (the marker remembers who moved it);
-- 0 when the entry had left the stream otherwise (done, or moved by another
-- consumer). Only an entry still in the stream is moved, so a repeated call
-- writes no second dead letter. The entry is XACKed in every case.
local found = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
if #found == 0 then
  return redis.call('GET', KEYS[3]) == ARGV[3] and 1 or 0
end
redis.call('XADD', KEYS[2], '*', unpack(cjson.decode(ARGV[5])))
redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('SET', KEYS[3], ARGV[3], 'EX', ARGV[4])
return 1
