-- taking.lua: how a limiter takes batches from lanes, and deletes idle ones. Part of the
-- limiter's function library, after mailpipe/lanes_common.lua (KEYS[1..9] as documented
-- there) and before decide.lua. Python twin: limiter/taking.py. Keep them in step.

-- -- taking batches from lanes ---------------------------------------------------------------

-- plan ARGV: server, fair (1: the server's rate is shared by turns), k
-- Ends the holds whose lease ended and the hold-offs whose time came, then says which lanes to
-- take from, in order: with fair share, the lanes of the first k tenants in turn order (high
-- first; a lane held somewhere is listed too, as a dead holder's batch may be back in it) and
-- every present high lane (high mail within its ration does not wait for a turn); without, the
-- present lanes, high first, then the oldest. Returns {now_us, lane, version, lane, version...}.
register('plan', function(keys, args)
  local now = time_us()
  local fair, k = args[2] == '1', tonumber(args[3])
  purge_holds(keys, now, PURGE)
  for _, tenant in ipairs(redis.call('ZRANGEBYSCORE', keys[OFF], '-inf', int(now))) do
    redis.call('ZREM', keys[OFF], tenant)
    update_waiting(keys, tenant, now)
  end
  update_active(keys, args[1])
  local out, seen = {now}, {}
  local function add(lane)
    if seen[lane] then return end
    seen[lane] = true
    out[#out + 1] = lane
    out[#out + 1] = hnum(keys, 'v:' .. lane)
  end
  local function held_off(lane)
    local off = tonumber(redis.call('ZSCORE', keys[OFF], tenant_of(lane)))
    return (off and off > now) or lane_off(keys, lane, now)
  end
  if fair then
    for _, tenant in ipairs(redis.call('ZRANGE', keys[TAGS], 0, k - 1)) do
      for _, lane in ipairs({'h:' .. tenant, 'n:' .. tenant}) do
        if not lane_off(keys, lane, now)
            and (redis.call('ZSCORE', keys[PRESENT], lane) or hnum(keys, 'hc:' .. lane) > 0) then
          add(lane)
        end
      end
    end
    for _, lane in ipairs(redis.call('ZRANGEBYSCORE', keys[PRESENT], '-inf', '(0', 'LIMIT', 0, k)) do
      if not held_off(lane) then add(lane) end
    end
  else
    for _, lane in ipairs(redis.call('ZRANGE', keys[PRESENT], 0, 4 * k - 1)) do
      if #out > 2 * k then break end
      if not held_off(lane) then add(lane) end
    end
  end
  return out
end)

-- hold ARGV: server, lease_us, members ("<token> <lane>") -- registered before basic.get.
-- Returns {now_us, per member: the lane's version, or -1: being deleted, do not take}.
register('hold', function(keys, args)
  local now = time_us()
  local lease = tonumber(args[2])
  local out = {now}
  for i = 3, #args do
    local member = args[i]
    local lane = lane_of(member)
    if hnum(keys, 'c:' .. lane) > now then
      out[#out + 1] = -1
    else
      if redis.call('ZADD', keys[HOLDS], int(now + lease), member) == 1 then hadd(keys, 'hc:' .. lane, 1) end
      out[#out + 1] = hnum(keys, 'v:' .. lane)
    end
  end
  update_active(keys, args[1])
  return out
end)

-- got ARGV: server, lease_us, then per member: member, the version hold returned, mails got
-- (0: the lane was empty). An empty lane is no longer present, unless a publish landed since.
-- Returns {now_us}.
register('got', function(keys, args)
  local now = time_us()
  local lease = tonumber(args[2])
  for i = 3, #args, 3 do
    local member, version, mails = args[i], tonumber(args[i + 1]), tonumber(args[i + 2])
    local lane = lane_of(member)
    if mails == 0 then
      drop_hold(keys, member)
      if hnum(keys, 'v:' .. lane) == version then
        redis.call('ZREM', keys[PRESENT], lane)
        redis.call('HDEL', keys[LANES], 'm:' .. lane)
      end
    else
      if redis.call('ZADD', keys[HOLDS], int(now + lease), member) == 1 then
        hadd(keys, 'hc:' .. lane, 1)  -- its lease had ended meanwhile: held again
      end
      hadd(keys, 'hm:' .. member, mails)
      hadd(keys, 'hmt:' .. lane, mails)
      hadd(keys, 'm:' .. lane, -mails)
    end
    update_waiting(keys, tenant_of(lane), now)
  end
  update_active(keys, args[1])
  return {now}
end)

-- release ARGV: server, then per member: member, requeued (1: the batch went back into its lane
-- unacked, the broker requeued it; 0: acked -- all granted, dead-lettered, or its rest published
-- into its lane again, which lane_exit counted). Returns {now_us}.
register('release', function(keys, args)
  local now = time_us()
  for i = 2, #args, 2 do
    local member, lane = args[i], lane_of(args[i])
    local _, left = drop_hold(keys, member)
    if args[i + 1] == '1' then
      hadd(keys, 'm:' .. lane, left)
      mark_present(keys, lane, now)
    end
    update_waiting(keys, tenant_of(lane), now)
  end
  update_active(keys, args[1])
  return {now}
end)

-- renew ARGV: server, lease_us, members. Returns {now_us, per member: 1 held, 0 its lease
-- had ended (its batch may be in its lane again: the holder gives it up)}.
register('renew', function(keys, args)
  local now = time_us()
  local out = {now}
  for i = 3, #args do
    if redis.call('ZSCORE', keys[HOLDS], args[i]) then
      redis.call('ZADD', keys[HOLDS], int(now + tonumber(args[2])), args[i])
      out[#out + 1] = 1
    else
      out[#out + 1] = 0
    end
  end
  return out
end)

-- hold_off ARGV: server, tenant, until_us (0: no longer). A tenant held off does not wait for
-- its turn (capped for today, paused); its lanes keep their mail. Returns {now_us}.
register('hold_off', function(keys, args)
  local now = time_us()
  local tenant, until_us = args[2], tonumber(args[3])
  if until_us > now then redis.call('ZADD', keys[OFF], int(until_us), tenant)
  else redis.call('ZREM', keys[OFF], tenant) end
  update_waiting(keys, tenant, now)
  return {now}
end)

-- lane_off ARGV: server, lane, until_us (0: no longer). A lane held off keeps its mail, which
-- is not taken and makes its tenant wait for no turn (a tenant's bulk mail paused, while its
-- transactional mail flows). Returns {now_us}.
register('lane_off', function(keys, args)
  local now = time_us()
  local lane, until_us = args[2], tonumber(args[3])
  if until_us > now then redis.call('HSET', keys[LANES], 'off:' .. lane, int(until_us))
  else redis.call('HDEL', keys[LANES], 'off:' .. lane) end
  update_waiting(keys, tenant_of(lane), now)
  return {now}
end)

-- close_begin ARGV: server, idle_s, lease_us, lanes. Each lane that is not present, held or
-- being published into, and idle for idle_s, is marked closing (no enter, no hold) for lease_us.
-- Returns {now_us, per lane: 1 closing (check it is empty, delete it, close_end), 0 not}.
register('close_begin', function(keys, args)
  local now, now_s = time_us()
  local idle, lease = tonumber(args[2]), tonumber(args[3])
  redis.call('ZREMRANGEBYSCORE', keys[PUBS], '-inf', int(now))
  local busy = {}
  for _, member in ipairs(redis.call('ZRANGE', keys[PUBS], 0, -1)) do busy[lane_of(member)] = true end
  local out = {now}
  for i = 4, #args do
    local lane = args[i]
    local last = tonumber(redis.call('ZSCORE', keys[KNOWN], lane))
    local ok = last and last <= now_s - idle and not busy[lane] and hnum(keys, 'hc:' .. lane) == 0
      and not redis.call('ZSCORE', keys[PRESENT], lane) and hnum(keys, 'c:' .. lane) <= now
    if ok then redis.call('HSET', keys[LANES], 'c:' .. lane, int(now + lease)) end
    out[#out + 1] = ok and 1 or 0
  end
  return out
end)

-- close_end ARGV: server, lane, deleted (1: its queue is gone; 0: it was not empty after all).
-- Returns {now_us}.
register('close_end', function(keys, args)
  local now = time_us()
  local lane = args[2]
  redis.call('HDEL', keys[LANES], 'c:' .. lane)
  if args[3] == '1' then
    redis.call('HINCRBY', keys[LANES], 'g:' .. lane, 1)
    redis.call('HDEL', keys[LANES], 'v:' .. lane, 'm:' .. lane)
    redis.call('ZREM', keys[KNOWN], lane)
  else
    mark_present(keys, lane, now)
    update_waiting(keys, tenant_of(lane), now)
    update_active(keys, args[1])
  end
  return {now}
end)

-- idle ARGV: server, idle_s, limit. Known lanes idle for idle_s, oldest first: what close_begin
-- may close. Returns {now_us, lanes...}.
register('idle', function(keys, args)
  local now, now_s = time_us()
  local out = {now}
  for _, lane in ipairs(redis.call('ZRANGEBYSCORE', keys[KNOWN], '-inf', now_s - tonumber(args[2]),
                                   'LIMIT', 0, tonumber(args[3]))) do
    out[#out + 1] = lane
  end
  return out
end)
