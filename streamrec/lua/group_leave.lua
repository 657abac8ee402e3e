-- group.py: remove a consumer from the group, only while it has nothing pending,
-- so a graceful exit leaves no trace in XINFO CONSUMERS and can never drop work.
-- KEYS[1]  the stream
-- ARGV[1]  the group, ARGV[2] the consumer's name
-- Returns the pending count XGROUP DELCONSUMER reports (0), or -1 when it kept
-- the consumer because entries are pending.
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) == 0 then
  return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
end
return -1
