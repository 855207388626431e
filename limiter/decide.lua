-- decide.lua: one release decision for one held batch, atomic; a give-back's refund; the
-- high-priority ration. Part of the limiter's function library, after lanes_common.lua and
-- taking.lua. Python twin: limiter/decide.py (`decide`, `refund`), which documents the maths
-- and which the tests check; keep them in step.
--
-- Every limit must allow the release and the smallest wins: the server's rate (GCRA, cost N,
-- grant burst B), its per-minute ceiling (an exact sliding window), the tenants' daily caps,
-- and the fair share's turn. A batch asks for what it can have now (a turn is one mail while
-- other tenants wait; alone, what the bucket holds), the rest is asked for again.
--
-- decide KEYS: 1..9 as lanes_common.lua, then
--   10 {p}:tat           rate GCRA, hash: tat (us), step = the interval it was counted in
--   11 {p}:minute        list: the Redis time (us) of each mail granted, newest first, at most
--                        the per-minute ceiling of them
--   12 {p}:released      ring of 10 s buckets over the last hour: b<i> bucket, c<i> mails
--   13 {p}:grant:<part>  the grant made for this part: n, at, tat, g (per tenant), published;
--                        a redelivered batch gets the same grant
--   14 {p}:round:<id>:<line> set when a decision of this round is refused or partial: the
--                        batches after it in the same line and round are not decided
--   15 {p}:released:<tenant> the fair tenant's own ring
--   16 {p}:pb            the server's pace (mailpipe/pushback.lua): eff and conf (a cut rate:
--                        the interval and the burst in proportion), state (paused: nothing
--                        until hold_until, unless by hand: nothing; then probing: one mail,
--                        probe_at), manual, backoff_until (after a rate signal: nothing till then)
--   17.. {<ns>}:day:<tenant> per tenant: day, end (the counted local day, epoch s), n (mails)
-- decide ARGV: 1 server, 2 cost, 3 interval_us (0: unlimited), 4 burst, 5 per_minute (0: none),
--   6 minute_span_us (60 s + the delivery window), 7 mark_ttl_s, 8 fair tenant ('' none),
--   9 weight, 10 ahead (1: high priority within its ration: no turn), 11 hold member ('' none),
--   12 hold lease_us, 13 lane ('' none), 14 k tenants, then per tenant: count, daily_limit,
--   6 local midnights (epoch s, ascending) around now
-- Returns {granted, retry_after_us, now_us, flags, granted per tenant...}: retry_after_us -1 =
-- not decided (KEYS[14] set); flags: 1 = the grant made before (cached), 2 = and its part is in
-- send (published), 4 = refused because another tenant's turn comes first.

local T_TAT, T_MINUTE, T_RELEASED, T_GRANT, T_ROUND, T_MINE, T_PB, T_DAY = 10, 11, 12, 13, 14, 15, 16, 17
local PER_TENANT, FIRST_TENANT = 8, 15
local MIN_TURN_RETRY = 50000
local PROBE_LEASE = 120000000  -- a probe's outcome is reported within this (window + SMTP timeout)
local PAUSED_RECHECK = 5000000  -- a paused server is asked again this often: a resume by hand applies at once

local function day_between(args, base, s)
  for i = 0, 4 do
    if tonumber(args[base + i]) <= s and s < tonumber(args[base + i + 1]) then
      return tonumber(args[base + i]), tonumber(args[base + i + 1])
    end
  end
  return nil
end

-- The counted day of a tenant: the one stored while it lasts (a time zone changed since takes
-- effect at its end), else today, from zero.
local function counted_day(key, args, base, now_s)
  local rec = redis.call('HMGET', key, 'day', 'end', 'n')
  local d, e = tonumber(rec[1]), tonumber(rec[2])
  if d and e and d <= now_s and now_s < e then return d, e, tonumber(rec[3]) or 0 end
  local today, tomorrow = day_between(args, base, now_s)
  if not today then return nil end
  return today, tomorrow, 0
end

local function store_tat(key, tat, step, now)
  redis.call('HSET', key, 'tat', int(tat), 'step', step)
  redis.call('PEXPIRE', key, math.floor((tat - now) / 1000) + 1000)
end

-- The TAT in the current step: after a rate change the mails still owed are owed at the new rate.
local function load_tat(key, step, now)
  local v = redis.call('HMGET', key, 'tat', 'step')
  local tat, old = tonumber(v[1]), tonumber(v[2])
  if tat and old and old ~= step and tat > now then
    tat = now + math.ceil((tat - now) * step / old)
    store_tat(key, tat, step, now)
  end
  return tat
end

local function ring_add(key, now_s, n)
  local bucket = math.floor(now_s / 10)
  local slot = bucket % 361
  if tonumber(redis.call('HGET', key, 'b' .. slot)) ~= bucket then
    redis.call('HSET', key, 'b' .. slot, bucket, 'c' .. slot, 0)
  end
  redis.call('HINCRBY', key, 'c' .. slot, n)
  redis.call('EXPIRE', key, 3700)
end

register('decide', function(keys, args)
  local now, now_s = time_us()
  if redis.call('EXISTS', keys[T_ROUND]) == 1 then return {0, -1, now, 0} end
  local function refused(retry, flags)
    redis.call('SET', keys[T_ROUND], '1', 'PX', 10000)
    return {0, retry, now, flags or 0}
  end
  local cost, interval, burst = tonumber(args[2]), tonumber(args[3]), tonumber(args[4])
  local per_minute, span, mark_ttl = tonumber(args[5]), tonumber(args[6]), tonumber(args[7])
  local fair, weight, ahead = args[8], tonumber(args[9]), args[10] == '1'
  local member, lease, lane = args[11], tonumber(args[12]), args[13]
  local k = tonumber(args[14])

  if member ~= '' and redis.call('ZSCORE', keys[HOLDS], member) then
    redis.call('ZADD', keys[HOLDS], int(now + lease), member)
  end

  -- 1. A part granted before (a redelivered batch) gets that grant again.
  local cached = redis.call('HMGET', keys[T_GRANT], 'n', 'at', 'g', 'published')
  if cached[1] then
    local out = {tonumber(cached[1]), 0, tonumber(cached[2]), cached[4] and 3 or 1}
    for v in string.gmatch(cached[3] or '', '%d+') do out[#out + 1] = tonumber(v) end
    return out
  end
  if cost == 0 then return {0, 0, now, 0} end

  -- 2. The server's pace: paused, nothing until its hold ends, then one probe at a time; after
  -- a cut, a longer interval and a burst in proportion.
  local pb = redis.call('HMGET', keys[T_PB], 'eff', 'conf', 'state', 'hold_until', 'probe_at', 'manual',
                        'backoff_until')
  local probing = false
  if pb[3] == 'paused' then
    local hold = tonumber(pb[4]) or 0
    if pb[6] == '1' or now < hold then return refused(math.min(math.max(hold - now, MIN_TURN_RETRY), PAUSED_RECHECK)) end
    redis.call('HSET', keys[T_PB], 'state', 'probing')
    pb[3] = 'probing'
  end
  if pb[3] == 'probing' then
    local probe_at = tonumber(pb[5]) or 0
    if now < probe_at + PROBE_LEASE then return refused(math.min(probe_at + PROBE_LEASE - now, PAUSED_RECHECK)) end
    probing = true
  end
  local eff, conf = tonumber(pb[1]), tonumber(pb[2])
  if interval > 0 and eff and conf and eff < conf then
    local slow = math.ceil(3600000000 / eff)
    if slow > interval then
      burst = math.max(1, math.floor(burst * eff / conf))
      interval = slow
    end
  end
  local backoff_until = tonumber(pb[7]) or 0
  if not probing and now < backoff_until then  -- held back after a rate signal
    if interval > 0 then load_tat(keys[T_TAT], interval, now) end  -- a cut's debt counted at its rate now
    return refused(backoff_until - now)
  end

  -- 3. A tenant held off (paused), or the lane of the batch, is not released.
  if fair ~= '' then
    local off = math.max(tonumber(redis.call('ZSCORE', keys[OFF], fair)) or 0,
                         lane ~= '' and hnum(keys, 'off:' .. lane) or 0)
    if off > now then return refused(off - now) end
  end

  -- 4. The daily caps; none left: held off until the first midnight that frees some.
  local tenants, allowed_total, retry = {}, 0, 0
  for i = 1, k do
    local base = FIRST_TENANT + (i - 1) * PER_TENANT
    local day, day_end, used = counted_day(keys[T_DAY + i - 1], args, base + 2, now_s)
    if not day then return redis.error_reply('decide: the day boundaries given do not cover Redis time') end
    local count, limit = tonumber(args[base]), tonumber(args[base + 1])
    local allowed = math.max(0, math.min(count, limit - used))
    tenants[i] = {day = day, day_end = day_end, used = used, allowed = allowed}
    allowed_total = allowed_total + allowed
    if count > 0 and allowed == 0 then
      local wait = day_end * 1000000 - now
      if retry == 0 or wait < retry then retry = wait end
    end
  end
  if k == 0 then allowed_total = cost end
  if allowed_total == 0 then
    if fair ~= '' then
      redis.call('ZADD', keys[OFF], int(now + retry), fair)
      update_waiting(keys, fair, now)
    end
    return refused(retry)
  end

  -- 5. The request: the smallest of the batch, the caps' room, the burst and the minute's ceiling.
  local ask = allowed_total
  if interval > 0 then ask = math.min(ask, burst) end
  if per_minute > 0 then ask = math.min(ask, per_minute) end
  local function tat_now() return math.max(load_tat(keys[T_TAT], interval, now) or 0, now) end
  local minute = {}  -- grant times still inside the minute's span, newest first
  if per_minute > 0 then
    for _, t in ipairs(redis.call('LRANGE', keys[T_MINUTE], 0, per_minute - 1)) do
      if tonumber(t) + span > now then minute[#minute + 1] = tonumber(t) end
    end
    table.sort(minute, function(a, b) return a > b end)
  end
  local function room()  -- mails the limits let go at once now
    local r = math.huge
    if interval > 0 then r = math.floor((burst * interval - (tat_now() - now)) / interval) end
    if per_minute > 0 then r = math.min(r, per_minute - #minute) end
    return math.max(0, r)
  end

  -- 6. Fair share: the tenant's start tag, its turn, the size of its turn.
  local queued = fair ~= '' and interval > 0
  local start, contended = 0, false
  if queued then
    purge_holds(keys, now, PURGE)
    local st = redis.call('HMGET', keys[FAIR], 'v', 'f:' .. fair)
    local tag = redis.call('ZSCORE', keys[TAGS], fair)
    start = tonumber(tag) or math.max(tonumber(st[1]) or 0, tonumber(st[2]) or 0)
    contended = redis.call('ZCARD', keys[TAGS]) - (tag and 1 or 0) > 0
    if contended and not ahead then
      local first = redis.call('ZRANGE', keys[TAGS], 0, 0, 'WITHSCORES')
      if tonumber(first[2]) < start then
        local before = redis.call('ZCOUNT', keys[TAGS], '-inf', '(' .. f17(start))
        return refused(math.max(tat_now() + (before + 1 - burst) * interval - now, MIN_TURN_RETRY), 4)
      end
    end
    if contended and not ahead then
      ask = 1  -- one mail a turn while others wait
    else
      ask = math.min(ask, math.max(1, room()))  -- alone (or within its ration): what the limits hold now
    end
  end

  if probing then ask = 1 end  -- one mail tries a paused server

  -- 7. Every limit must allow `ask` now: the GCRA, then the minute's window.
  local wait, tat = 0, 0
  if interval > 0 then
    tat = tat_now()
    wait = tat + ask * interval - burst * interval - now
  end
  if per_minute > 0 and #minute + ask > per_minute then
    wait = math.max(wait, minute[per_minute - ask + 1] + span - now)
  end
  if wait > 0 then return refused(wait) end

  -- 8. Granted: move the limits, count the mails, update the fair queue, remember the grant.
  local record = {'n', ask, 'at', int(now)}
  if interval > 0 then
    store_tat(keys[T_TAT], tat + ask * interval, interval, now)
    table.insert(record, 'tat'); table.insert(record, int(tat + ask * interval))
  end
  if per_minute > 0 then
    for _ = 1, ask do redis.call('LPUSH', keys[T_MINUTE], int(now)) end
    redis.call('LTRIM', keys[T_MINUTE], 0, per_minute - 1)
    redis.call('PEXPIRE', keys[T_MINUTE], math.floor(span / 1000) + 1000)
  end
  local out, per_tenant, left = {ask, 0, now, 0}, {}, ask
  for i = 1, k do
    local tn = tenants[i]
    local g = math.min(tn.allowed, left)
    left = left - g
    if g > 0 then
      redis.call('HSET', keys[T_DAY + i - 1], 'day', tn.day, 'end', tn.day_end, 'n', tn.used + g)
      redis.call('EXPIRE', keys[T_DAY + i - 1], 3 * 86400)
    end
    out[#out + 1] = g
    per_tenant[#per_tenant + 1] = int(g)
  end
  ring_add(keys[T_RELEASED], now_s, ask)
  if queued then
    local finish = start + ask / weight
    if not ahead then  -- transactional mail moves its own tenant's tag, never everyone's
      local v = tonumber(redis.call('HGET', keys[FAIR], 'v')) or 0
      if contended then v = math.max(v, start) else v = math.max(v, finish) end
      redis.call('HSET', keys[FAIR], 'v', f17(v))
    end
    redis.call('HSET', keys[FAIR], 'f:' .. fair, f17(finish))
    if redis.call('ZSCORE', keys[TAGS], fair) then redis.call('ZADD', keys[TAGS], f17(finish), fair) end
    ring_add(keys[T_MINE], now_s, ask)
  end
  if member ~= '' then
    hadd(keys, 'hm:' .. member, -ask)
    hadd(keys, 'hmt:' .. lane, -ask)
  end
  if probing then redis.call('HSET', keys[T_PB], 'probe_at', int(now)) end
  if ask < cost then redis.call('SET', keys[T_ROUND], '1', 'PX', 10000) end  -- the rest: next round
  table.insert(record, 'g'); table.insert(record, table.concat(per_tenant, ' '))
  redis.call('HSET', keys[T_GRANT], unpack(record))
  redis.call('EXPIRE', keys[T_GRANT], mark_ttl)
  return out
end)

-- refund: a give-back's tokens, once per grant and only what the grant still owes: its mails
-- whose time has not come yet, and only while it is the last grant taken (the TAT is where it
-- left it); a daily count comes back only within the day the grant was counted in.
-- KEYS: 1 {p}:tat, 2 {p}:grant:<refund_of>, 3.. {<ns>}:day:<tenant>
-- ARGV: 1 refund (mails), 2 interval_us, then per tenant: its share of the refund.
-- Returns {now_us, 1 applied / 0 not (applied before, or the grant is no longer known)}.
register('refund', function(keys, args)
  local now = time_us()
  local refund, interval = tonumber(args[1]), tonumber(args[2])
  if refund <= 0 or redis.call('HEXISTS', keys[2], 'n') == 0
      or redis.call('HSETNX', keys[2], 'refunded', 1) == 0 then
    return {now, 0}
  end
  local g = redis.call('HMGET', keys[2], 'at', 'tat')
  if interval > 0 then
    local v = redis.call('HMGET', keys[1], 'tat', 'step')
    local after = tonumber(g[2])
    if after and tonumber(v[1]) == after and tonumber(v[2]) == interval then
      local back = math.min(refund, math.floor((after - now) / interval))
      if back > 0 then store_tat(keys[1], after - back * interval, interval, now) end
    end
  end
  local granted_s = math.floor(tonumber(g[1]) / 1000000)
  for i = 3, #keys do
    local share = tonumber(args[i])
    local rec = redis.call('HMGET', keys[i], 'day', 'end', 'n')
    local d, e, n = tonumber(rec[1]), tonumber(rec[2]), tonumber(rec[3]) or 0
    if share > 0 and n > 0 and d and e and d <= granted_s and granted_s < e then
      redis.call('HSET', keys[i], 'n', math.max(0, n - share))
    end
  end
  return {now, 1}
end)

-- ration: may these tenants' high-priority mails go ahead of the line? Each tenant has an
-- allowance per server for transactional mail: a GCRA at a share of the server's rate. All of
-- a batch's tenants must have room; then each takes its mails. Otherwise nothing is taken and
-- the batch waits for its turn as normal mail.
-- KEYS[i] {p}:high:<tenant> (hash: tat)   ARGV: 1 interval_us, 2 burst, 3.. mails per tenant
-- Returns 1 (ahead) or 0.
register('ration', function(keys, args)
  local now = time_us()
  local interval, burst = tonumber(args[1]), tonumber(args[2])
  local tats = {}
  for i = 1, #keys do
    local n = tonumber(args[2 + i])
    local tat = math.max(tonumber(redis.call('HGET', keys[i], 'tat')) or 0, now)
    if n > burst or tat + n * interval - burst * interval > now then return 0 end
    tats[i] = tat + n * interval
  end
  for i = 1, #keys do
    redis.call('HSET', keys[i], 'tat', int(tats[i]))
    redis.call('PEXPIRE', keys[i], math.floor((tats[i] - now) / 1000) + 1000)
  end
  return 1
end)
