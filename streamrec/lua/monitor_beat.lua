-- monitor.py: a consumer's heartbeat in the consumer registry, or its leaving,
-- and the outcomes of its entries since its last beat counted into time slots.
-- Loaded after outcomes_prune.lua (its prelude), which prunes slots past the hour.
-- KEYS[1]  the registry ({ns}:consumers): name -> heartbeat expiry (ms, server time)
-- KEYS[2]  the heartbeats ({ns}:heartbeats): name -> its last heartbeat (JSON)
-- KEYS[3]  outcome counts ({ns}:outcomes): '<outcome>:<slot>' -> count
-- KEYS[4]  the slots counted ({ns}:outcome-slots): slot -> slot
-- KEYS[5]  running totals counted so far ({ns}:outcome-totals): '<name>:<outcome>' -> total
-- ARGV[1]  the consumer's name, ARGV[2] how long the beat lives (ms),
-- ARGV[3]  the heartbeat JSON; empty when the consumer leaves (its entry goes)
-- ARGV[4]  slot length (ms), ARGV[5] how many slots are kept (older ones are pruned)
-- ARGV[6..] triples, one per outcome, every outcome each time: its name, this
--          process's running total of it, and that total as of the process's
--          last call that Redis confirmed
-- A slot is Redis time divided by the slot length, so all consumers count into
-- the same slots whatever their own clocks say. A call adds its totals less
-- those this consumer's last applied call stored (a repeated call adds nothing;
-- one whose reply was lost is not counted twice); with none stored (the first
-- beat, or the consumer was pruned while it could not beat) it adds its totals
-- less the confirmed ones, what the process knows is not counted yet.
-- Returns the number of expired consumers pruned (up to 100 per call).
-- Readers skip expired members themselves, so pruning may lag. Safe to repeat.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local names = {}
for i = 6, #ARGV, 3 do
  names[#names + 1] = ARGV[i]
end

local expired = redis.call('ZRANGE', KEYS[1], '-inf', now, 'BYSCORE', 'LIMIT', 0, 100)
if #expired > 0 then
  redis.call('ZREM', KEYS[1], unpack(expired))
  redis.call('HDEL', KEYS[2], unpack(expired))
  for _, gone in ipairs(expired) do
    for _, name in ipairs(names) do
      redis.call('HDEL', KEYS[5], gone .. ':' .. name)
    end
  end
end
if ARGV[3] == '' then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
else
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
end

local slot = math.floor(now / tonumber(ARGV[4]))
local slot_name = string.format('%d', slot)
for i = 6, #ARGV, 3 do
  local total, confirmed = tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local field = ARGV[1] .. ':' .. ARGV[i]
  local stored = tonumber(redis.call('HGET', KEYS[5], field) or '-1')
  local added = total - confirmed
  if stored >= confirmed and stored <= total then
    added = total - stored -- else none stored, or a process before this one's under its name
  end
  if added > 0 then
    redis.call('HINCRBY', KEYS[3], ARGV[i] .. ':' .. slot_name, added)
    redis.call('ZADD', KEYS[4], slot, slot_name)
  end
  if ARGV[3] == '' then
    redis.call('HDEL', KEYS[5], field)
  else
    redis.call('HSET', KEYS[5], field, total)
  end
end

prune_outcomes(KEYS[3], KEYS[4], slot, tonumber(ARGV[5]))
return #expired
