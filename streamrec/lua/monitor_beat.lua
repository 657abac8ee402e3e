-- monitor.py: a consumer's heartbeat in the consumer registry, or its leaving.
-- KEYS[1]  the registry ({ns}:consumers): name -> heartbeat expiry (ms, server time)
-- KEYS[2]  the heartbeats ({ns}:heartbeats): name -> its last heartbeat (JSON)
-- ARGV[1]  the consumer's name, ARGV[2] how long the beat lives (ms),
-- ARGV[3]  the heartbeat JSON; empty when the consumer leaves (its entry goes)
-- Returns the number of expired consumers pruned (up to 100 per call).
-- Readers skip expired members themselves, so pruning may lag. Safe to repeat.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expired = redis.call('ZRANGE', KEYS[1], '-inf', now, 'BYSCORE', 'LIMIT', 0, 100)
if #expired > 0 then
  redis.call('ZREM', KEYS[1], unpack(expired))
  redis.call('HDEL', KEYS[2], unpack(expired))
end
if ARGV[3] == '' then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
else
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
end
return #expired
