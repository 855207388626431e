-- release.lua: a holder lets go of its claims (sender/claims.py). Only fields it still holds
-- change: a lease that expired and was taken over is no longer its to release.
-- KEYS[i] a claim hash; ARGV[1] owner; ARGV[2] ttl_s; ARGV[2 + i] "<recipient>\n<new state>"
local owner = ARGV[1]
for i = 1, #KEYS do
  local rcpt, state = string.match(ARGV[2 + i], '^(.-)\n(.*)$')
  local v = redis.call('HGET', KEYS[i], rcpt)
  if v and string.sub(v, 1, #owner + 3) == 'h ' .. owner .. ' ' then
    redis.call('HSET', KEYS[i], rcpt, state)
    redis.call('EXPIRE', KEYS[i], tonumber(ARGV[2]))
  end
end
return #KEYS
