-- reconcile.py: claim the scheduled reconcile run, once per interval across all consumers.
-- KEYS[1]  the lease ({ns}:reconcile:lease): who runs a reconcile now
-- KEYS[2]  the interval marker ({ns}:reconcile:next): present until the next run is due
-- ARGV[1]  this consumer's name, ARGV[2] the lease (ms), ARGV[3] the interval (ms)
-- Returns 1 when the run is this consumer's (it now holds the lease, and the
-- next run is due one interval from now), 0 when a run is in progress or not due.
if redis.call('EXISTS', KEYS[1], KEYS[2]) > 0 then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[3])
return 1
