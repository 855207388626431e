-- release.lua: a holder settles its claims (sender/claims.py). Only fields it still holds
-- change: a lease that expired and was taken over is no longer its to settle.
-- KEYS[i] a claim hash; ARGV[1] owner; ARGV[2] ttl_s; ARGV[2 + i] "<recipient>\n<new state>"
-- From "h <owner> ..." (held) any state; from "D <owner> ..." (a deferral recorded before its
-- retry copy was published) only "D" again or an outcome that is final for this attempt,
-- "d <grant>" or "x <grant>": a fence's "a <grant>" must not erase that the next attempt exists.
-- Returns, per field, 1 if it was this holder's and now holds the new state, else 0.
local owner = ARGV[1]
local out = {}
for i = 1, #KEYS do
  local rcpt, state = string.match(ARGV[2 + i], '^(.-)\n(.*)$')
  local v = redis.call('HGET', KEYS[i], rcpt)
  local done = 0
  if v and string.sub(v, 3, #owner + 3) == owner .. ' ' then
    local kind, into = string.sub(v, 1, 2), string.sub(state, 1, 2)
    if kind == 'h ' or (kind == 'D ' and (into == 'D ' or into == 'd ' or into == 'x ')) then
      redis.call('HSET', KEYS[i], rcpt, state)
      redis.call('EXPIRE', KEYS[i], tonumber(ARGV[2]))
      done = 1
    end
  end
  out[#out + 1] = done
end
return out
