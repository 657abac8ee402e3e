-- tally.py: one batch of a webhook process's answer counts added to the outcome
-- slots (beside the consumers' outcomes, see monitor_beat.lua), once.
-- Loaded after outcomes_prune.lua (its prelude), which prunes slots past the hour.
-- KEYS[1]  outcome counts ({ns}:outcomes): '<outcome>:<slot>' -> count
-- KEYS[2]  the slots counted ({ns}:outcome-slots): slot -> slot
-- KEYS[3]  the process's marker ({ns}:tally:<process>): the last batch number added
-- ARGV[1]  slot length (ms), ARGV[2] how many slots are kept (older ones are pruned)
-- ARGV[3]  the batch's number (each process numbers its batches 1, 2, ...)
-- ARGV[4]  how long the marker lives (ms)
-- ARGV[5..] pairs: an outcome's name and its count in this batch
-- The counts go into the slot of Redis time now, as the consumers' do. A batch
-- numbered at or below the marker was added already (a call repeated after a
-- lost reply) and adds nothing. Returns 1 when the batch was added, else 0.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local slot = math.floor(now / tonumber(ARGV[1]))
local batch = tonumber(ARGV[3])
local added = 0
if batch > tonumber(redis.call('GET', KEYS[3]) or '0') then
  local slot_name = string.format('%d', slot)
  for i = 5, #ARGV, 2 do
    local count = tonumber(ARGV[i + 1])
    if count > 0 then
      redis.call('HINCRBY', KEYS[1], ARGV[i] .. ':' .. slot_name, count)
      redis.call('ZADD', KEYS[2], slot, slot_name)
    end
  end
  redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[4])
  added = 1
end
prune_outcomes(KEYS[1], KEYS[2], slot, tonumber(ARGV[2]))
return added
