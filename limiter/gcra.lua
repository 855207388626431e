-- gcra.lua: one release decision for one batch, atomic. The Python twin is limiter/gcra.py
-- (`decide`), which documents the maths and which the unit tests check; keep them in step.
--
-- Time is Redis TIME in microseconds; no worker clock enters the decision. Every limit must
-- allow the release and the smallest wins: the server's rate (GCRA, cost N, burst B), its
-- optional per-minute ceiling (a second GCRA), and each tenant's daily cap. A batch asks for
-- min(N, B, minute burst, what the daily caps still allow): a larger batch is split (the
-- caller returns the rest), never stuck. B here is the grant burst: the server's burst less
-- what its rate sends in one delivery window (limiter/gcra.py says why).
--
-- Key layout, p = "<namespace>:<server>", all under one hash tag so they share a cluster slot:
--   KEYS[1] {p}:tat              rate GCRA, hash: tat = theoretical arrival time (us), step = the
--                                interval it was counted in; PEXPIREs once the bucket is full
--   KEYS[2] {p}:tat:minute       per-minute ceiling GCRA: the same
--   KEYS[3] {p}:released         hash, ring of 10 s buckets over the last hour: b<i> = bucket
--                                number, c<i> = mails released in it (i = bucket mod 361)
--   KEYS[4] {p}:grant:<batch>    hash, the grant made for this batch id: n = mails, at = Redis
--                                time (us), tat / mtat = each TAT just after it, g = mails per
--                                tenant, published = 1 once its part is confirmed in send
--                                (RedisLimiter.published); a redelivered batch gets the same
--                                grant, not a second one
--   KEYS[5] {p}:grant:<refund_of> the grant a give-back returns; `refunded` is set in it once
--                                applied, so a refund is applied once and only while the grant
--                                is known (an expired grant refunds nothing)
--   KEYS[6] {p}:queue:<round>:<line> set when a decision of this round is refused or granted in
--                                part: the batches after it in the same pipelined round (the
--                                same line of the same replica, in order) are then not decided,
--                                so a small batch never overtakes a larger one ahead of it
--   KEYS[7] {p}:fair             hash: v = the server's virtual time; f:<tenant> = the tenant's
--                                finish tag; b:<tenant> = mails held for it (the last asker's)
--   KEYS[8] {p}:fair:tags        zset: the tenants with mail waiting, by start tag
--   KEYS[9] {p}:fair:alive       zset: their leases (us); an ended lease is no longer waiting
--   KEYS[10] {p}:released:<tenant> the fair tenant's own ring of 10 s buckets, as KEYS[3]
--   KEYS[10+i] {n:<tenant's server>}:day:<tenant>  hash: day = local midnight (epoch s) of the
--                                counted day, n = mails released that day
--
-- ARGV[1] cost: mails in the batch (N)          ARGV[2] refund: mails given back (R)
-- ARGV[3] interval_us: us per mail at the rate, 0 = unlimited (no GCRA, daily caps still apply)
-- ARGV[4] burst: mails one grant may take (B)
-- ARGV[5] minute_interval_us: us per mail of the per-minute ceiling, 0 = none
-- ARGV[6] minute_burst                           ARGV[7] mark_ttl_s: life of KEYS[4]
-- ARGV[8] fair tenant ('' = no fair share)       ARGV[9] its weight
-- ARGV[10] backlog: mails the caller holds for it on this server, this batch's included
-- ARGV[11] ahead: 1 = high priority within its ration, does not wait for its turn
-- ARGV[12] lease_us: how long past its next ask a waiting tenant keeps its place
-- ARGV[13] k: tenants; then per tenant, in KEYS order: count, daily_limit, refund (its share of
--         R), and 6 local midnights (epoch s, ascending) around now, from which the script
--         picks today
--
-- Fair share (limiter/gcra.py says why): start-time fair queuing per server. A waiting tenant's
-- start tag is max(v, its finish tag); only the lowest may take tokens (ties allowed); a turn
-- is one mail while others wait, what the bucket holds when alone.
--
-- Returns {granted, retry_after_us, now_us, cached, granted per tenant...}: granted = 0 with
-- retry_after_us > 0 means "ask again then"; retry_after_us = -1: not decided (KEYS[6] is
-- set); cached = 1 when KEYS[4] answered, 2 when it also says the grant was published (its
-- part is in the send queue: a redelivered batch need not publish it again).

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now_s = tonumber(t[1])
local cost, refund = tonumber(ARGV[1]), tonumber(ARGV[2])
local interval, burst = tonumber(ARGV[3]), tonumber(ARGV[4])
local m_interval, m_burst = tonumber(ARGV[5]), tonumber(ARGV[6])
local mark_ttl = tonumber(ARGV[7])
local fair, weight, backlog = ARGV[8], tonumber(ARGV[9]), tonumber(ARGV[10])
local ahead, lease = ARGV[11] == '1', tonumber(ARGV[12])
local k = tonumber(ARGV[13])
local PER_TENANT = 9
local FIRST = 14
local DAY = 10
local MIN_TURN_RETRY = 50000
local PURGE_PER_DECISION = 32

if redis.call('EXISTS', KEYS[6]) == 1 then return {0, -1, now, 0} end
local function refused(retry)
  redis.call('SET', KEYS[6], '1', 'PX', 10000)
  return {0, retry, now, 0}
end

-- The local day containing `s` (its midnight and the next), or nil outside the days given.
local function day_of(base, s)
  for i = 0, 4 do
    if tonumber(ARGV[base + i]) <= s and s < tonumber(ARGV[base + i + 1]) then
      return tonumber(ARGV[base + i]), tonumber(ARGV[base + i + 1])
    end
  end
  return nil
end

local tenants = {}
for i = 1, k do
  local base = FIRST + (i - 1) * PER_TENANT
  local today, tomorrow = day_of(base + 3, now_s)
  if not today then return redis.error_reply('gcra.lua: the day boundaries given do not cover Redis time') end
  local day = redis.call('HMGET', KEYS[DAY + i], 'day', 'n')
  local used = 0
  if tonumber(day[1]) == today then used = tonumber(day[2]) or 0 end
  tenants[i] = {count = tonumber(ARGV[base]), limit = tonumber(ARGV[base + 1]),
                refund = tonumber(ARGV[base + 2]), base = base, today = today, tomorrow = tomorrow,
                used = used}
end

local function store_tat(key, tat, step)
  redis.call('HSET', key, 'tat', string.format('%d', tat), 'step', step)
  redis.call('PEXPIRE', key, math.floor((tat - now) / 1000) + 1000)
end

-- A TAT in the current step: when the rate changed (servers file), the mails still owed
-- are rescaled to the new rate, and stored so, so it applies at once, not after the old debt.
local function load_tat(key, step)
  local v = redis.call('HMGET', key, 'tat', 'step')
  local tat, old = tonumber(v[1]), tonumber(v[2])
  if tat and old and old ~= step and tat > now then
    tat = now + math.ceil((tat - now) * step / old)
    store_tat(key, tat, step)
  end
  return tat
end

-- Give back at most what the grant still owes: its mails whose time has not come yet. Only
-- while that grant is the last one taken (the TAT is still where it left it): tokens of an
-- older grant sit under later grants' mails, and handing them back would let the next grant
-- take the same time twice.
local function gcra_refund(key, step, tat_after)
  local v = redis.call('HMGET', key, 'tat', 'step')
  if not tat_after or tonumber(v[1]) ~= tat_after or tonumber(v[2]) ~= step then return end
  local back = math.min(refund, math.floor((tat_after - now) / step))
  if back > 0 then store_tat(key, tat_after - back * step, step) end
end

-- 1. The refund, once per grant, and only while the grant is remembered.
if refund > 0 and redis.call('HEXISTS', KEYS[5], 'n') == 1
    and redis.call('HSETNX', KEYS[5], 'refunded', 1) == 1 then
  local g = redis.call('HMGET', KEYS[5], 'at', 'tat', 'mtat')
  if interval > 0 then gcra_refund(KEYS[1], interval, tonumber(g[2])) end
  if m_interval > 0 then gcra_refund(KEYS[2], m_interval, tonumber(g[3])) end
  local granted_s = math.floor(tonumber(g[1]) / 1000000)
  for i = 1, k do
    local tn = tenants[i]
    -- Only a grant made today lowers today's count: a cap is never exceeded at midnight.
    if tn.refund > 0 and tn.used > 0 and day_of(tn.base + 3, granted_s) == tn.today then
      tn.used = math.max(0, tn.used - tn.refund)
      redis.call('HSET', KEYS[DAY + i], 'day', tn.today, 'n', tn.used)
    end
  end
end

-- 2. A batch granted before (a redelivery) gets that grant again.
local cached = redis.call('HMGET', KEYS[4], 'n', 'at', 'g', 'published')
if cached[1] then
  local out = {tonumber(cached[1]), 0, tonumber(cached[2]), cached[4] and 2 or 1}
  for v in string.gmatch(cached[3] or '', '%d+') do out[#out + 1] = tonumber(v) end
  return out
end
if cost == 0 then return {0, 0, now, 0} end

-- 3. What the daily caps allow; none left: ask again at the first midnight that frees some.
local allowed_total = 0
local retry = 0
for i = 1, k do
  local tn = tenants[i]
  tn.allowed = math.max(0, math.min(tn.count, tn.limit - tn.used))
  allowed_total = allowed_total + tn.allowed
  if tn.count > 0 and tn.allowed == 0 then
    local wait = tn.tomorrow * 1000000 - now
    if retry == 0 or wait < retry then retry = wait end
  end
end
if k == 0 then allowed_total = cost end
local queued = fair ~= '' and interval > 0
local function f17(x) return string.format('%.17g', x) end
local function leave()
  redis.call('ZREM', KEYS[8], fair)
  redis.call('ZREM', KEYS[9], fair)
  redis.call('HDEL', KEYS[7], 'b:' .. fair)
end
local function wait_in_line(tag, until_us, mails)
  redis.call('ZADD', KEYS[8], f17(tag), fair)
  redis.call('ZADD', KEYS[9], string.format('%d', until_us), fair)
  redis.call('HSET', KEYS[7], 'b:' .. fair, mails)
  for i = 7, 9 do redis.call('EXPIRE', KEYS[i], 86400) end
end
if allowed_total == 0 then
  if queued then leave() end  -- capped for today: not waiting for this server
  return refused(retry)
end

-- 4. The request: the smallest of the batch, the caps' room and each burst.
local ask = allowed_total
if interval > 0 then ask = math.min(ask, burst) end
if m_interval > 0 then ask = math.min(ask, m_burst) end

local function tat_of(key, step) return math.max(load_tat(key, step) or 0, now) end
local function room(key, step, b) return math.max(0, math.floor((b * step - (tat_of(key, step) - now)) / step)) end

-- 5. Fair share: the tenant's start tag, its turn, the size of its turn.
local start, contended = 0, false
if queued then
  local ended = redis.call('ZRANGEBYSCORE', KEYS[9], '-inf', now, 'LIMIT', 0, PURGE_PER_DECISION)
  for _, name in ipairs(ended) do
    redis.call('ZREM', KEYS[8], name)
    redis.call('ZREM', KEYS[9], name)
    redis.call('HDEL', KEYS[7], 'b:' .. name)
  end
  local state = redis.call('HMGET', KEYS[7], 'v', 'f:' .. fair)
  local v = tonumber(state[1]) or 0
  local tag = redis.call('ZSCORE', KEYS[8], fair)
  start = tonumber(tag) or math.max(v, tonumber(state[2]) or 0)
  contended = redis.call('ZCARD', KEYS[8]) - (tag and 1 or 0) > 0
  if contended and not ahead then
    local first = redis.call('ZRANGE', KEYS[8], 0, 0, 'WITHSCORES')
    if tonumber(first[2]) < start then
      local before = redis.call('ZCOUNT', KEYS[8], '-inf', '(' .. f17(start))
      local turn = math.max(tat_of(KEYS[1], interval) + (before + 1 - burst) * interval - now, MIN_TURN_RETRY)
      wait_in_line(start, now + turn + lease, backlog)
      return refused(turn)
    end
  end
  if contended then
    ask = 1  -- one mail a turn while others wait
  else
    local r = room(KEYS[1], interval, burst)
    if m_interval > 0 then r = math.min(r, room(KEYS[2], m_interval, m_burst)) end
    ask = math.min(ask, math.max(1, r))  -- alone: what the bucket holds now, at least one mail
  end
end

-- 6. GCRA for `ask` tokens: allowed when tat + ask*step - burst*step <= now.
local function gcra_wait(key, step, b)
  local tat = tat_of(key, step)
  return tat + ask * step - b * step - now, tat
end
local wait, tat, m_wait, m_tat = 0, 0, 0, 0
if interval > 0 then wait, tat = gcra_wait(KEYS[1], interval, burst) end
if m_interval > 0 then m_wait, m_tat = gcra_wait(KEYS[2], m_interval, m_burst) end
wait = math.max(wait, m_wait)
if wait > 0 then
  if queued then wait_in_line(start, now + wait + lease, backlog) end
  return refused(wait)
end

-- 7. Granted: move the TATs, count the mails per tenant and per 10 s bucket, remember the grant.
local record = {'n', ask, 'at', string.format('%d', now)}
if interval > 0 then
  store_tat(KEYS[1], tat + ask * interval, interval)
  table.insert(record, 'tat'); table.insert(record, string.format('%d', tat + ask * interval))
end
if m_interval > 0 then
  store_tat(KEYS[2], m_tat + ask * m_interval, m_interval)
  table.insert(record, 'mtat'); table.insert(record, string.format('%d', m_tat + ask * m_interval))
end
local out = {ask, 0, now, 0}
local per_tenant = {}
local left = ask
for i = 1, k do
  local tn = tenants[i]
  local g = math.min(tn.allowed, left)
  left = left - g
  if g > 0 then
    redis.call('HSET', KEYS[DAY + i], 'day', tn.today, 'n', tn.used + g)
    redis.call('EXPIRE', KEYS[DAY + i], 3 * 86400)
  end
  out[#out + 1] = g
  per_tenant[#per_tenant + 1] = string.format('%d', g)
end
local bucket = math.floor(now_s / 10)
local slot = bucket % 361
if tonumber(redis.call('HGET', KEYS[3], 'b' .. slot)) ~= bucket then
  redis.call('HSET', KEYS[3], 'b' .. slot, bucket, 'c' .. slot, 0)
end
redis.call('HINCRBY', KEYS[3], 'c' .. slot, ask)
redis.call('EXPIRE', KEYS[3], 3700)
if queued then
  local finish = start + ask / weight
  local v = tonumber(redis.call('HGET', KEYS[7], 'v')) or 0
  if contended then v = math.max(v, start) else v = math.max(v, finish) end
  redis.call('HSET', KEYS[7], 'v', f17(v), 'f:' .. fair, f17(finish))
  redis.call('EXPIRE', KEYS[7], 86400)
  if backlog > ask then wait_in_line(finish, now + interval + lease, backlog - ask) else leave() end
  if tonumber(redis.call('HGET', KEYS[10], 'b' .. slot)) ~= bucket then
    redis.call('HSET', KEYS[10], 'b' .. slot, bucket, 'c' .. slot, 0)
  end
  redis.call('HINCRBY', KEYS[10], 'c' .. slot, ask)
  redis.call('EXPIRE', KEYS[10], 3700)
end
if ask < cost then redis.call('SET', KEYS[6], '1', 'PX', 10000) end  -- the rest is decided next round
table.insert(record, 'g'); table.insert(record, table.concat(per_tenant, ' '))
redis.call('HSET', KEYS[4], unpack(record))
redis.call('EXPIRE', KEYS[4], mark_ttl)
return out
