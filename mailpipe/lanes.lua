-- lanes.lua: publishing into a server's lanes (the packer, and the limiter handing a batch back).
-- Follows lanes_common.lua in the library; KEYS[1..9] as documented there.
--
-- A publish into lane L is bracketed: lane_enter before it, lane_exit once the broker confirmed
-- it. Between the two the publisher is registered (p:pubs, with a lease), so a limiter never
-- deletes L's queue while a publish into it may land; and L cannot be entered while it is
-- being deleted (c:L).

-- lane_enter ARGV: server, token, lease_us, lanes...
-- Returns {now_us, per lane: its generation (publishers declare the queue again when it
-- changed), or -1: being deleted, ask again in a moment}.
register('lane_enter', function(keys, args)
  local now, now_s = time_us()
  local token, lease = args[2], tonumber(args[3])
  local out = {now}
  for i = 4, #args do
    local lane = args[i]
    if hnum(keys, 'c:' .. lane) > now then
      out[#out + 1] = -1
    else
      redis.call('ZADD', keys[PUBS], int(now + lease), token .. ' ' .. lane)
      redis.call('ZADD', keys[KNOWN], now_s, lane)
      out[#out + 1] = hnum(keys, 'g:' .. lane)
    end
  end
  return out
end)

-- lane_exit ARGV: server, token, then per lane: lane, mails published into it (confirmed).
-- Returns {now_us}.
register('lane_exit', function(keys, args)
  local now, now_s = time_us()
  local token = args[2]
  for i = 3, #args, 2 do
    local lane, mails = args[i], tonumber(args[i + 1])
    redis.call('ZREM', keys[PUBS], token .. ' ' .. lane)
    redis.call('ZADD', keys[KNOWN], now_s, lane)
    hadd(keys, 'm:' .. lane, mails)
    mark_present(keys, lane, now)
    update_waiting(keys, tenant_of(lane), now)
  end
  update_active(keys, args[1])
  return {now}
end)
