-- pushback.lua: how fast a server takes mail, followed from what it answers (issue 22): its
-- effective rate (cut on throttling, grown back when quiet), its connection cap, and whether it
-- is paused (broken: a wrong password, relaying denied). The Python twin is mailpipe/pushback.py
-- (Controller), which documents the policy; keep them in step. The limiter's decision reads the
-- same hash (limiter/decide.lua): every replica applies a change on its next grant.
--
-- KEYS, all of one server (p = "{<namespace>:<server>}"):
--   1 p:pb        hash: conf = the configured rate (mails/h) last seen, eff = the effective rate,
--                 state = active | paused | probing, manual = 1 when paused by hand,
--                 hold_until, hold_us (the current hold; doubled while probes fail), probe_at
--                 (the last probe's grant), last_cut, last_change (us), since = successes
--                 since the last change, streak = server-broken signals in a row, cap = the
--                 connection cap, clean = clean sessions since the cap last moved, fp = the
--                 credentials' fingerprint, reason, rule, sample = why the last change,
--                 backoff_us, backoff_until = a rate signal's hold on grants (doubled while
--                 refusals go on after it, dropped by a success)
--   2 p:pb:seen   set: the signals counted (job, attempt and class): counted once, however
--                 many senders saw them
--   3 p:pb:conns  zset: the connections open to the server, every sender replica's -> lease end
--
-- ARGV[1..12] of every function but conn_*, the policy (mailpipe/pushback.py, Policy):
--   1 conf: the configured rate (mails/h)   2 concurrency: the configured connections
--   3 cut_interval_us  4 floor (mails/h)  5 quiet_us  6 quiet_mails  7 step (mails/h)
--   8 pause_after  9 hold_us (the first hold)  10 hold_max_us  11 resume_at (share of conf)
--   12 backoff_us (the first hold on grants after a rate signal; at most cut_interval_us)

local HASH, SEEN, CONNS = 1, 2, 3
local SEEN_TTL_S = 3600
local WANTED_US = 2000000  -- a refused connection keeps the server wanted this long (polled every 0.5 s)

local function time_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

local function num(v, default) return tonumber(v) or default end
local function f17(x) return string.format('%.17g', x) end

-- The state as stored, with the defaults of a server never heard of: active at its rate.
local function load(keys, args)
  local v = redis.call('HMGET', keys[HASH], 'conf', 'eff', 'state', 'manual', 'hold_until', 'hold_us',
                       'last_cut', 'last_change', 'since', 'streak', 'cap', 'clean', 'backoff_us', 'backoff_until')
  local conf = tonumber(args[1])
  local s = {conf = conf, eff = num(v[2], conf), state = v[3] or 'active', manual = v[4] == '1',
             hold_until = num(v[5], 0), hold_us = num(v[6], 0), last_cut = num(v[7], 0),
             last_change = num(v[8], 0), since = num(v[9], 0), streak = num(v[10], 0),
             cap = num(v[11], tonumber(args[2])), clean = num(v[12], 0), backoff_us = num(v[13], 0),
             backoff_until = num(v[14], 0)}
  local stored_conf = tonumber(v[1])
  if stored_conf ~= conf then  -- the servers file changed the rate: never above it
    s.eff = math.min(s.eff, conf)
    if stored_conf and s.eff == stored_conf then s.eff = conf end  -- at full rate before: at full rate now
  end
  s.cap = math.max(1, math.min(s.cap, tonumber(args[2])))
  return s
end

local function save(keys, s)
  redis.call('HSET', keys[HASH], 'conf', f17(s.conf), 'eff', f17(s.eff), 'state', s.state,
             'manual', s.manual and 1 or 0, 'hold_until', f17(s.hold_until), 'hold_us', f17(s.hold_us),
             'last_cut', f17(s.last_cut), 'last_change', f17(s.last_change), 'since', s.since,
             'streak', s.streak, 'cap', s.cap, 'clean', s.clean, 'backoff_us', f17(s.backoff_us),
             'backoff_until', f17(s.backoff_until))
end

local function why(keys, reason, rule, sample)
  redis.call('HSET', keys[HASH], 'reason', reason, 'rule', rule or '', 'sample', sample or '')
end

-- report ARGV: the policy (1..12), then successes, then per signal: class, rule, cut (the
-- share of the rate left after a cut: 0.5 explicit, 0.7 vague), dedupe key, sample reply.
-- A rate signal also holds grants back a while (backoff): a server whose window is full
-- refuses everything until it slides, and the mails granted meanwhile would all be refused.
-- Doubled by a refusal after the hold ended (of a mail granted after it, not one in flight)
-- when nothing got through, up to the cut interval; a report with successes starts it over.
-- Returns {now_us, then the changes it made, 5 values each: kind (cut, grew, cap, paused,
-- resumed), the effective rate before, after, the state after, the rule}.
register('pb_report', function(keys, args)
  local now = time_us()
  local s = load(keys, args)
  local cut_interval, floor, quiet = tonumber(args[3]), tonumber(args[4]), tonumber(args[5])
  local quiet_mails, step, pause_after = tonumber(args[6]), tonumber(args[7]), tonumber(args[8])
  local hold_first, hold_max, resume_at = tonumber(args[9]), tonumber(args[10]), tonumber(args[11])
  local backoff_first, successes = tonumber(args[12]), tonumber(args[13])
  if successes > 0 then s.backoff_us = 0 end
  local out = {now}
  local function changed(kind, before, rule, reason, sample)
    out[#out + 1] = kind
    out[#out + 1] = f17(before)
    out[#out + 1] = f17(s.eff)
    out[#out + 1] = s.state
    out[#out + 1] = rule or ''
    why(keys, reason, rule, sample)
  end
  for i = 14, #args, 5 do
    local class, rule, cut, dedupe, sample = args[i], args[i + 1], tonumber(args[i + 2]), args[i + 3], args[i + 4]
    if redis.call('SADD', keys[SEEN], dedupe .. ' ' .. class) == 1 then
      redis.call('EXPIRE', keys[SEEN], SEEN_TTL_S)
      if class == 'rate' then
        if s.state == 'active' and now - s.last_cut >= cut_interval then
          local before = s.eff
          s.eff = math.max(floor, s.eff * cut)
          s.last_cut, s.last_change, s.since = now, now, 0
          changed('cut', before, rule, 'throttled', sample)
        end
        if now >= s.backoff_until then
          s.backoff_us = math.min(cut_interval, s.backoff_us > 0 and s.backoff_us * 2 or backoff_first)
          s.backoff_until = now + s.backoff_us
        end
      elseif class == 'connections' and s.cap > 1 then
        s.cap, s.clean = s.cap - 1, 0
        changed('cap', s.eff, rule, 'too many connections', sample)
      elseif class == 'server_broken' then
        s.streak = s.streak + 1
        if s.state == 'probing' then  -- the probe failed: hold again, twice as long
          s.state, s.hold_us = 'paused', math.min(hold_max, math.max(hold_first, s.hold_us * 2))
          s.hold_until = now + s.hold_us
          changed('paused', s.eff, rule, 'the probe failed', sample)
        elseif s.state == 'active' and s.streak >= pause_after then
          s.state, s.hold_us, s.hold_until = 'paused', hold_first, now + hold_first
          changed('paused', s.eff, rule, 'broken', sample)
        end
      end
    end
  end
  if successes > 0 then
    s.streak = 0
    if (s.state == 'paused' and not s.manual) or s.state == 'probing' then
      local before = s.eff
      s.state, s.eff, s.hold_us, s.hold_until = 'active', math.max(floor, s.conf * resume_at), 0, 0
      s.last_change, s.since = now, 0
      changed('resumed', before, '', 'a mail went through', '')
    end
    s.since = s.since + successes
    if s.state == 'active' and s.eff < s.conf and now - s.last_change >= quiet and s.since >= quiet_mails then
      local before = s.eff
      s.eff = math.min(s.conf, s.eff + step)
      s.last_change, s.since = now, 0
      changed('grew', before, '', 'quiet', '')
    end
  end
  save(keys, s)
  return out
end)

-- pause ARGV: the policy (1..12), reason. By hand: no probe resumes it. Returns {now_us, the change}.
register('pb_pause', function(keys, args)
  local now = time_us()
  local s = load(keys, args)
  local before = s.eff
  s.state, s.manual, s.hold_until = 'paused', true, now + 100 * 365 * 86400 * 1000000
  save(keys, s)
  why(keys, args[13], 'manual', '')
  return {now, 'paused', f17(before), f17(s.eff), s.state, 'manual'}
end)

-- resume ARGV: the policy (1..12), reason. At once, at the effective rate it had (the password
-- fixed, the relay allowed): nothing says the server was overloaded. Returns {now_us, the
-- change, if any}.
register('pb_resume', function(keys, args)
  local now = time_us()
  local s = load(keys, args)
  if s.state == 'active' then save(keys, s) return {now} end
  s.state, s.manual, s.hold_until, s.hold_us, s.streak = 'active', false, 0, 0, 0
  s.last_change, s.since, s.backoff_us, s.backoff_until = now, 0, 0, 0
  save(keys, s)
  why(keys, args[13], 'manual', '')
  return {now, 'resumed', f17(s.eff), f17(s.eff), s.state, 'manual'}
end)

-- credentials ARGV: the policy (1..12), the credentials' fingerprint (the servers file as
-- loaded). A changed fingerprint resumes a paused server (its password was fixed). Returns
-- {now_us, the change, if any}.
register('pb_credentials', function(keys, args)
  local now = time_us()
  local old = redis.call('HGET', keys[HASH], 'fp')
  redis.call('HSET', keys[HASH], 'fp', args[13])
  if not old or old == args[13] then return {now} end
  local s = load(keys, args)
  if s.state == 'active' then return {now} end
  s.state, s.manual, s.hold_until, s.hold_us, s.streak = 'active', false, 0, 0, 0
  s.last_change, s.since, s.backoff_us, s.backoff_until = now, 0, 0, 0
  save(keys, s)
  why(keys, 'its credentials changed', 'credentials', '')
  return {now, 'resumed', f17(s.eff), f17(s.eff), s.state, 'credentials'}
end)

-- conn_open ARGV: concurrency, connection id, lease_us. A connection may open while fewer than
-- the cap are open (every sender replica's), one while server-broken signals run in a row. A
-- refusal marks the server wanted for WANTED_US: a replica that keeps connections idle closes
-- them rather than hold places another waits for (conn_wanted).
-- Returns {1, 0, cap} or {0, retry_after_us, cap}.
register('pb_conn_open', function(keys, args)
  local now = time_us()
  redis.call('ZREMRANGEBYSCORE', keys[CONNS], '-inf', now)
  local v = redis.call('HMGET', keys[HASH], 'cap', 'streak')
  local cap = math.max(1, math.min(num(v[1], tonumber(args[1])), tonumber(args[1])))
  -- A server that says it is broken for us is tried on one connection at a time, by every
  -- replica together, until it takes a mail (or is paused): not a login storm per replica.
  if num(v[2], 0) > 0 then cap = 1 end
  if redis.call('ZSCORE', keys[CONNS], args[2]) or redis.call('ZCARD', keys[CONNS]) < cap then
    redis.call('ZADD', keys[CONNS], now + tonumber(args[3]), args[2])
    redis.call('PEXPIRE', keys[CONNS], math.floor(tonumber(args[3]) / 1000) + 1000)
    return {1, 0, cap}
  end
  redis.call('HSET', keys[HASH], 'wanted_until', now + WANTED_US)
  local first = redis.call('ZRANGE', keys[CONNS], 0, 0, 'WITHSCORES')
  return {0, math.max(1000, tonumber(first[2]) - now), cap}
end)

-- conn_wanted: 1 while a replica waits for a place under the cap (see conn_open), else 0.
register('pb_conn_wanted', function(keys, args)
  return num(redis.call('HGET', keys[HASH], 'wanted_until'), 0) > time_us() and 1 or 0
end)

-- conn_close ARGV: concurrency, connection id, clean (1: the session ended without a connection
-- signal). After as many clean sessions as the cap, the cap grows by one, up to concurrency.
-- Returns {cap}.
register('pb_conn_close', function(keys, args)
  redis.call('ZREM', keys[CONNS], args[2])
  local concurrency = tonumber(args[1])
  local v = redis.call('HMGET', keys[HASH], 'cap', 'clean')
  local cap, clean = math.min(num(v[1], concurrency), concurrency), num(v[2], 0)
  if args[3] == '1' and cap < concurrency then
    clean = clean + 1
    if clean >= cap then cap, clean = cap + 1, 0 end
    redis.call('HSET', keys[HASH], 'cap', cap, 'clean', clean)
  end
  return {cap}
end)
