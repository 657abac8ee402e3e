-- reconcile.py: renew or release the lease of a running reconcile, only while it is ours.
-- KEYS[1]  the lease ({ns}:reconcile:lease)
-- ARGV[1]  this consumer's name, ARGV[2] the new lease (ms), or 0 to release it
-- Returns 1 if the lease was this consumer's (now renewed or released), else 0.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
if ARGV[2] == '0' then
  redis.call('DEL', KEYS[1])
else
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 1
