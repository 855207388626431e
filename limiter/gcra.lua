-- gcra.lua: one release decision for one batch, atomic. The Python twin is limiter/gcra.py
-- (`decide`), which documents the maths and which the unit tests check; keep them in step.
--
-- Time is Redis TIME in microseconds; no worker clock enters the decision. Every limit must
-- allow the release and the smallest wins: the server's rate (GCRA, cost N, burst B), its
-- optional per-minute ceiling (a second GCRA), and each tenant's daily cap. A batch asks for
-- min(N, B, minute burst, what the daily caps still allow): a larger batch is split (the
-- caller returns the rest), never stuck.
--
-- Key layout, p = "<namespace>:<server>", all under one hash tag so they share a cluster slot:
--   KEYS[1] {p}:tat              rate GCRA, hash: tat = theoretical arrival time (us), step = the
--                                interval it was counted in; PEXPIREs once the bucket is full
--   KEYS[2] {p}:tat:minute       per-minute ceiling GCRA: the same
--   KEYS[3] {p}:released         hash, ring of 10 s buckets over the last hour: b<i> = bucket
--                                number, c<i> = mails released in it (i = bucket mod 361)
--   KEYS[4] {p}:grant:<batch>    the grant already made for this batch id ("granted now_us
--                                per-tenant..."), so a
--                                redelivered batch gets the same grant, not a second one
--   KEYS[5] {p}:refund:<batch>   set once this batch's refund is applied (idempotent refunds)
--   KEYS[6] {p}:queue:<round>    set when a decision of this round is refused: the batches
--                                after it in the same pipelined round (the same server's line,
--                                in order) are then not decided, so a small batch never
--                                overtakes a larger one refused ahead of it
--   KEYS[6+i] {n:<tenant's server>}:day:<tenant>  hash: day = local midnight (epoch s) of the
--                                counted day, n = mails released that day
--
-- ARGV[1] cost: mails in the batch (N)          ARGV[2] refund: tokens given back (R)
-- ARGV[3] interval_us: us per mail at the rate, 0 = unlimited (no GCRA, daily caps still apply)
-- ARGV[4] burst: mails the rate lets through at once (B)
-- ARGV[5] minute_interval_us: us per mail of the per-minute ceiling, 0 = none
-- ARGV[6] minute_burst                           ARGV[7] mark_ttl_s: life of KEYS[4], KEYS[5]
-- ARGV[8] refund_horizon_us: a refund lowers today's counts only if the grant it returns
--         (at most this long ago) was made today, so a cap is never exceeded across midnight
-- ARGV[9] k: tenants; then per tenant, in KEYS order: count, daily_limit, and 6 local
--         midnights (epoch s, ascending) around now, from which the script picks today
--
-- Returns {granted, retry_after_us, now_us, cached, granted per tenant...}: granted = 0 with
-- retry_after_us > 0 means "ask again then"; retry_after_us = -1: not decided (KEYS[6] is
-- set); cached = 1 when KEYS[4] answered.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now_s = tonumber(t[1])
local cost, refund = tonumber(ARGV[1]), tonumber(ARGV[2])
local interval, burst = tonumber(ARGV[3]), tonumber(ARGV[4])
local m_interval, m_burst = tonumber(ARGV[5]), tonumber(ARGV[6])
local mark_ttl, horizon, k = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])

if redis.call('EXISTS', KEYS[6]) == 1 then return {0, -1, now, 0} end
local function refused(retry)
  redis.call('SET', KEYS[6], '1', 'PX', 10000)
  return {0, retry, now, 0}
end

-- The local day containing `s`: the index i with midnights[i] <= s < midnights[i+1].
local function day_of(base, s)
  for i = 0, 4 do
    if tonumber(ARGV[base + i]) <= s and s < tonumber(ARGV[base + i + 1]) then
      return tonumber(ARGV[base + i]), tonumber(ARGV[base + i + 1])
    end
  end
  return redis.error_reply('gcra.lua: the day boundaries given do not cover Redis time')
end

local tenants = {}
for i = 1, k do
  local base = 10 + (i - 1) * 8
  local today, tomorrow = day_of(base + 2, now_s)
  if type(today) == 'table' then return today end
  local back = day_of(base + 2, math.floor((now - horizon) / 1000000))
  if type(back) == 'table' then return back end
  local day = redis.call('HMGET', KEYS[6 + i], 'day', 'n')
  local used = 0
  if tonumber(day[1]) == today then used = tonumber(day[2]) or 0 end
  tenants[i] = {count = tonumber(ARGV[base]), limit = tonumber(ARGV[base + 1]), today = today,
                tomorrow = tomorrow, same_day = (back == today), used = used}
end

local function store_tat(key, tat, step)
  redis.call('HSET', key, 'tat', tat, 'step', step)
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

local function gcra_refund(key, step)
  local tat = load_tat(key, step)
  if tat then
    -- Never below now: a refund cannot give more than a full bucket.
    store_tat(key, math.max(now, tat - refund * step), step)
  end
end

-- 1. The refund, once per refunding batch id.
if refund > 0 and redis.call('SET', KEYS[5], '1', 'NX', 'EX', mark_ttl) then
  if interval > 0 then gcra_refund(KEYS[1], interval) end
  if m_interval > 0 then gcra_refund(KEYS[2], m_interval) end
  local left = refund
  for i = 1, k do
    local tn = tenants[i]
    local back = math.min(tn.count, left)
    left = left - back
    if tn.same_day and tn.used > 0 and back > 0 then
      tn.used = math.max(0, tn.used - back)
      redis.call('HSET', KEYS[6 + i], 'day', tn.today, 'n', tn.used)
    end
  end
end

-- 2. A batch granted before (a redelivery) gets that grant again.
local cached = redis.call('GET', KEYS[4])
if cached then
  local out = {}
  for v in string.gmatch(cached, '%d+') do out[#out + 1] = tonumber(v) end
  table.insert(out, 2, 0)
  table.insert(out, 4, 1)
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
if allowed_total == 0 then return refused(retry) end

-- 4. The request: the smallest of the batch, the caps' room and each burst.
local ask = allowed_total
if interval > 0 then ask = math.min(ask, burst) end
if m_interval > 0 then ask = math.min(ask, m_burst) end

-- 5. GCRA for `ask` tokens: allowed when tat + ask*step - burst*step <= now.
local function gcra_wait(key, step, b)
  local tat = math.max(load_tat(key, step) or 0, now)
  return tat + ask * step - b * step - now, tat
end
local wait, tat, m_wait, m_tat = 0, 0, 0, 0
if interval > 0 then wait, tat = gcra_wait(KEYS[1], interval, burst) end
if m_interval > 0 then m_wait, m_tat = gcra_wait(KEYS[2], m_interval, m_burst) end
wait = math.max(wait, m_wait)
if wait > 0 then return refused(wait) end

-- 6. Granted: move the TATs, count the mails per tenant and per 10 s bucket, remember the grant.
if interval > 0 then store_tat(KEYS[1], tat + ask * interval, interval) end
if m_interval > 0 then store_tat(KEYS[2], m_tat + ask * m_interval, m_interval) end
local out = {ask, 0, now, 0}
-- string.format: tostring() would keep only 14 digits of a microsecond time.
local grant = {string.format('%d', ask), string.format('%d', now)}
local left = ask
for i = 1, k do
  local tn = tenants[i]
  local g = math.min(tn.allowed, left)
  left = left - g
  if g > 0 then
    redis.call('HSET', KEYS[6 + i], 'day', tn.today, 'n', tn.used + g)
    redis.call('EXPIRE', KEYS[6 + i], 3 * 86400)
  end
  out[#out + 1] = g
  grant[#grant + 1] = string.format('%d', g)
end
local bucket = math.floor(now_s / 10)
local slot = bucket % 361
if tonumber(redis.call('HGET', KEYS[3], 'b' .. slot)) ~= bucket then
  redis.call('HSET', KEYS[3], 'b' .. slot, bucket, 'c' .. slot, 0)
end
redis.call('HINCRBY', KEYS[3], 'c' .. slot, ask)
redis.call('EXPIRE', KEYS[3], 3700)
redis.call('SET', KEYS[4], table.concat(grant, ' '), 'EX', mark_ttl)
return out
