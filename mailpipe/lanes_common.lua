-- lanes_common.lua: what every function on a server's lanes and fair queue shares. It is the
-- first part of both function libraries (mailpipe/lanes.lua, limiter/limiter.lua); the Python
-- twin is mailpipe/lanes.py (LaneBook), which documents the protocol.
--
-- KEYS[1..9] are the same for every function, all of one server but the last
-- (p = "{<namespace>:<server>}"):
--   1 p:lanes      hash, per lane L ("n:<tenant>" normal, "h:<tenant>" high priority):
--                  v:L version (+1 at every publish into it, and when a held batch comes back),
--                  m:L mails ready in its queue (about), g:L generation (+1 each time its queue is
--                  deleted: publishers declare it again), c:L closing until (us),
--                  hc:L batches of it held by limiters, hmt:L their mails left,
--                  hm:<token> <L> the mails left in one held batch, off:L held off until (us):
--                  its mail waits and is not taken (a tenant's bulk mail paused)
--   2 p:present    zset: lanes that may hold ready mail -> since (us; high lanes since - 1e16, so
--                  that they come first)
--   3 p:pubs       zset: "<token> <L>" a publish into L under way -> lease end (us)
--   4 p:holds      zset: "<token> <L>" a batch of L held unacked by a limiter -> lease end (us)
--   5 p:known      zset: lanes whose queue may exist -> last activity (s)
--   6 p:fair       hash: v = the server's virtual time, f:<tenant> = the tenant's finish tag
--   7 p:fair:tags  zset: tenants waiting -> start tag; the lowest goes next
--   8 p:fair:off   zset: tenants held off (capped for today, paused) -> until (us)
--   9 <ns>:active  set: servers with a lane present or held (one key for every server)

local LANES, PRESENT, PUBS, HOLDS, KNOWN, FAIR, TAGS, OFF, ACTIVE = 1, 2, 3, 4, 5, 6, 7, 8, 9
local PURGE = 32  -- ended holds dropped per call: bounded work, whatever was left behind
local HIGH_FIRST = 1e16  -- p:present scores of high lanes are since - this: they sort first

local function time_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2]), tonumber(t[1])
end

local function f17(x) return string.format('%.17g', x) end
local function int(x) return string.format('%d', x) end
local function tenant_of(lane) return string.sub(lane, 3) end
local function lane_of(member) return string.match(member, '^%S+ (.*)$') end

local function hnum(keys, field) return tonumber(redis.call('HGET', keys[LANES], field)) or 0 end

-- Add to a counter of p:lanes, never below zero (estimates: a crash may count twice).
local function hadd(keys, field, n)
  local v = hnum(keys, field) + n
  if v > 0 then redis.call('HSET', keys[LANES], field, v) else redis.call('HDEL', keys[LANES], field) end
end

local function lane_off(keys, lane, now) return hnum(keys, 'off:' .. lane) > now end

-- Mail of this tenant anywhere for the server: in one of its lanes, or held by a limiter; a
-- lane held off does not count.
local function has_mail(keys, tenant, now)
  for _, lane in ipairs({'n:' .. tenant, 'h:' .. tenant}) do
    if not lane_off(keys, lane, now)
        and (redis.call('ZSCORE', keys[PRESENT], lane) or hnum(keys, 'hc:' .. lane) > 0) then
      return true
    end
  end
  return false
end

-- The tenant waits for its turn while it has mail and is not held off; it joins at
-- max(v, its finish tag): neither credit nor loss for the time it was away.
local function update_waiting(keys, tenant, now)
  local off = tonumber(redis.call('ZSCORE', keys[OFF], tenant))
  local waiting = has_mail(keys, tenant, now) and not (off and off > now)
  local tag = redis.call('ZSCORE', keys[TAGS], tenant)
  if waiting and not tag then
    local st = redis.call('HMGET', keys[FAIR], 'v', 'f:' .. tenant)
    redis.call('ZADD', keys[TAGS], f17(math.max(tonumber(st[1]) or 0, tonumber(st[2]) or 0)), tenant)
  elseif tag and not waiting then
    redis.call('ZREM', keys[TAGS], tenant)
  end
end

-- Mail is (again) in lane L's queue: present, and a new version, so that an older "empty"
-- reading of it does not take it away.
local function mark_present(keys, lane, now)
  local since = now
  if string.sub(lane, 1, 2) == 'h:' then since = now - HIGH_FIRST end
  redis.call('ZADD', keys[PRESENT], 'NX', int(since), lane)
  redis.call('HINCRBY', keys[LANES], 'v:' .. lane, 1)
end

-- A hold ends (acked, handed back, found empty, or its holder gone): 1 if it was there.
local function drop_hold(keys, member)
  if redis.call('ZREM', keys[HOLDS], member) == 0 then return 0, 0 end
  local lane = lane_of(member)
  local left = hnum(keys, 'hm:' .. member)
  redis.call('HDEL', keys[LANES], 'hm:' .. member)
  hadd(keys, 'hc:' .. lane, -1)
  hadd(keys, 'hmt:' .. lane, -left)
  return 1, left
end

-- Holders whose lease ended are gone (a dead limiter: RabbitMQ gave its batches back to their
-- lanes): their lanes are present again, with their mails. At most `limit` per call.
local function purge_holds(keys, now, limit)
  local ended = redis.call('ZRANGEBYSCORE', keys[HOLDS], '-inf', int(now), 'LIMIT', 0, limit)
  for _, member in ipairs(ended) do
    local lane = lane_of(member)
    local _, left = drop_hold(keys, member)
    hadd(keys, 'm:' .. lane, left)
    mark_present(keys, lane, now)
    update_waiting(keys, tenant_of(lane), now)
  end
  return #ended
end

-- The server is active while a lane of it is present or held; otherwise it leaves the set.
local function update_active(keys, server)
  if redis.call('ZCARD', keys[PRESENT]) > 0 or redis.call('ZCARD', keys[HOLDS]) > 0 then
    redis.call('SADD', keys[ACTIVE], server)
  else
    redis.call('SREM', keys[ACTIVE], server)
  end
end
