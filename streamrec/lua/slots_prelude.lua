-- semaphore.py: the call layout and helpers shared by every slots_*.lua script
-- (the prelude, prepended to each when it is loaded).
--
-- Layout of every slots script call (built by semaphore.encode):
--   KEYS[1] the stream              KEYS[2] slot-limits hash     KEYS[3] parked-due sorted set
--   KEYS[4] slot-businesses set     KEYS[5] the previous version's parked set
--   KEYS[6] the sweep lock
--   KEYS[5 + 2j], KEYS[6 + 2j]: business j's slots sorted set and parked list (j = 1 .. nb)
--   ARGV[1] group   ARGV[2] lease ms   ARGV[3] default limit
--   ARGV[4], ARGV[5] the slots and parked key prefixes, for businesses a script finds in
--     Redis (the sweep's, the picture's); every key shares the namespace's hash tag, so a
--     script still touches one cluster slot
--   ARGV[6] nb   ARGV[6 + j] business j's name
--   ARGV[7 + nb] the entries, space-separated, each "j value ..." naming its business by j
--   ARGV[8 + nb] ... what the script takes besides (``rest`` is the first one's index)
--
-- Keys of a business: its slots sorted set (holder entry id -> lease expiry, Redis time ms)
-- and its parked list (JSON {f = fields, d = deliveries before, id, at}, oldest first).
-- The parked-due index scores each business that has parked entries with the earliest time
-- one of them could be woken (its first lease expiry), so a sweep reads only the businesses
-- due. The registry lists every business that holds slots, has
-- parked entries or a limit of its own (what ``slots list`` shows).

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local now = now_ms()
local stream, limits, due, registry = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local legacy, lock = KEYS[5], KEYS[6]
local group, lease, default = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local nb = tonumber(ARGV[6])
local entries = ARGV[7 + nb] or ''
local rest = 8 + nb

-- Stream ids compare as (milliseconds, sequence) pairs.
local function id_after(a, b)
  local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
  ams, bms = tonumber(ams), tonumber(bms)
  return ams > bms or (ams == bms and tonumber(aseq) > tonumber(bseq))
end

-- The group's last-delivered id: read once per call, and only once a lease ran out.
local last_delivered
local function undelivered(id)
  if last_delivered == nil then
    last_delivered = '0-0'
    local groups = redis.pcall('XINFO', 'GROUPS', stream)
    if type(groups) == 'table' and not groups.err then
      for _, g in ipairs(groups) do
        local info = {}
        for k = 1, #g, 2 do info[g[k]] = g[k + 1] end
        if info.name == group then last_delivered = info['last-delivered-id'] end
      end
    end
  end
  return id_after(id, last_delivered) and #redis.call('XRANGE', stream, id, id) > 0
end

-- Drop the holders whose lease ran out: a crashed holder's slot frees. A slot that wake
-- reserved is renewed instead while its entry still waits in the stream, delivered to no
-- consumer: a backlog longer than the lease delays the entry, it must not cost it its turn.
local function expire(slots)
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', slots, '-inf', now)) do
    if undelivered(id) then
      redis.call('ZADD', slots, now + lease, id)
    else
      redis.call('ZREM', slots, id)
    end
  end
end

-- What one call knows of a business, each part read once and only when needed.
local cache, touched = {}, {}
local function state(name, slots, parked)
  local b = cache[name]
  if not b then
    b = {name = name, slots = slots, parked = parked}
    cache[name] = b
  end
  return b
end

local function business(j)
  return state(ARGV[6 + j], KEYS[5 + 2 * j], KEYS[6 + 2 * j])
end

local function named(name)
  return state(name, ARGV[4] .. name, ARGV[5] .. name)
end

local function held(b)
  if b.held == nil then
    expire(b.slots)
    b.held = redis.call('ZCARD', b.slots)
  end
  return b.held
end

local function limit(b)
  if b.limit == nil then
    b.limit = tonumber(redis.call('HGET', limits, b.name)) or default
  end
  return b.limit
end

local function queued(b)
  if b.queued == nil then b.queued = redis.call('LLEN', b.parked) end
  return b.queued
end

local function register(b)
  if not b.registered then
    redis.call('SADD', registry, b.name)
    b.registered = true
  end
end

local function touch(b)
  if not b.touched then
    b.touched = true
    touched[#touched + 1] = b
  end
end

-- Take, or renew, the slot of entry id for one lease.
local function take(b, id)
  if redis.call('ZADD', b.slots, now + lease, id) == 1 and b.held then b.held = b.held + 1 end
end

-- Move parked entries into free slots: back onto the stream, a slot reserved for each.
local function wake(b)
  local woken = 0
  while queued(b) > 0 and held(b) < limit(b) do
    local p = cjson.decode(redis.call('LPOP', b.parked))
    local fields = p.f
    if p.d > 0 then
      fields[#fields + 1] = 'prior_deliveries'
      fields[#fields + 1] = string.format('%d', p.d)
    end
    fields[#fields + 1] = 'woken'
    fields[#fields + 1] = '1'
    take(b, redis.call('XADD', stream, '*', unpack(fields)))
    b.queued = b.queued - 1
    woken = woken + 1
  end
  return woken
end

-- Keep a business's place in the parked-due index current: while it has parked entries,
-- the earliest time one could be woken (its first lease expiry; now if it holds no slot and
-- may hold one). Once nothing is parked it leaves the index, and the registry too unless it
-- holds slots or has a limit of its own.
local function index(b)
  if queued(b) > 0 then
    local first = tonumber(redis.call('ZRANGE', b.slots, 0, 0, 'WITHSCORES')[2])
    if not first then first = limit(b) > 0 and now or now + lease end
    redis.call('ZADD', due, first, b.name)
  else
    redis.call('ZREM', due, b.name)
    if redis.call('EXISTS', b.slots) == 0 and redis.call('HEXISTS', limits, b.name) == 0 then
      redis.call('SREM', registry, b.name)
    end
  end
end

-- After a call's changes to a business: wake what fits, then index it.
-- Returns how many entries were woken.
local function settle(b)
  local woken = wake(b)
  index(b)
  return woken
end

local function settle_touched()
  local woken = 0
  for _, b in ipairs(touched) do woken = woken + settle(b) end
  return woken
end
