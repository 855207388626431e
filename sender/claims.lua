-- claims.lua: claim the recipients of a batch's jobs for one holder, atomically, in one round
-- trip. The Python side is sender/claims.py, which documents the states.
--
-- KEYS[i]  {<namespace>:<server>}:claim:<tenant>:<job id>:<created_ms>:<attempt>, a hash: recipient -> state
--          "s"                          sent (the server said 250)
--          "h <owner> <until_us> <grant>" held by owner until then, under that grant
--          "x <grant>" / "r <grant>"    released by a holder of that grant, its outcome published
--                                       (x: refused for good or expired, a dead letter, which a
--                                       replay sends under this attempt again; r: given back)
--          "D <owner> <until_us> <grant>" deferred by owner (its lease as for "h"), recorded BEFORE
--                                       its retry copy is published: never sent under this attempt
--                                       again; once the lease is over the copy may never have gone
--                                       out, so the next holder publishes it again (takes it over)
--          "d <grant>"                  deferred by a holder of that grant, its retry copy (the next
--                                       attempt, under another key) published: final for every
--                                       holder of this attempt, whatever its grant
--          "a <grant>"                  attempted or held under that grant, outcome unknown
--                                       (a holder fenced after a lost connection)
-- ARGV[1] owner  ARGV[2] grant  ARGV[3] until_us: the lease  ARGV[4] cutoff_us: past it, nothing
-- is claimed (no mail may start), only classified (a "D" is still taken over: that publishes a
-- retry copy, it sends nothing)  ARGV[5] ttl_s of the hash
-- ARGV[6..] per key: n, then n recipients
--
-- Returns {now_us, code per recipient in order...}:
--   1 claimed now, or claimable when past the cutoff (never touched under this grant)
--   2 sent already          3 held by a live holder (ask again later)
--   4 touched under this grant, outcome unknown: not sent under it again, given back unrefunded
--   5 released by another holder of this grant, or deferred to the next attempt under any
--     grant: its outcome is published, nothing to do here
--   6 deferred by a holder whose lease is over, its retry copy perhaps never published: taken
--     over by this holder (now "D" as owner), which publishes the copy (attempt + 1) again

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local owner, grant = ARGV[1], ARGV[2]
local until_us, cutoff, ttl = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local claim = now < cutoff
local held = 'h ' .. owner .. ' ' .. until_us .. ' ' .. grant
local deferring = 'D ' .. owner .. ' ' .. until_us .. ' ' .. grant
local out = {now}
local arg = 6
for i = 1, #KEYS do
  local n = tonumber(ARGV[arg])
  local touched = false
  for j = 1, n do
    local rcpt = ARGV[arg + j]
    local v = redis.call('HGET', KEYS[i], rcpt)
    local code = 1
    if v == 's' then
      code = 2
    elseif v then
      local kind, a, b, c = string.match(v, '^(%a) ?(%S*) ?(%S*) ?(%S*)$')
      if (kind == 'h' or kind == 'D') and tonumber(b) and tonumber(b) > now then
        code = 3
      elseif kind == 'D' then
        code = 6
        redis.call('HSET', KEYS[i], rcpt, deferring)
        touched = true
      else
        local of = (kind == 'h') and c or a  -- an expired lease: its holder is gone
        if kind == 'd' then
          code = 5  -- its retry copy sends it: sent under this attempt too, it would go twice
        elseif of == grant then
          if kind == 'x' or kind == 'r' then code = 5 else code = 4 end
        end
      end
    end
    if code == 1 and claim then
      redis.call('HSET', KEYS[i], rcpt, held)
      touched = true
    end
    out[#out + 1] = code
  end
  if touched then redis.call('EXPIRE', KEYS[i], ttl) end
  arg = arg + n + 1
end
return out
