-- Record one bounce, complaint, unsubscribe or manual suppression of a (tenant, address), at once.
--
-- KEYS[1]  the suppression:     <ns>:suppressed:<tenant>:<address>   string "kind: reason", TTL or none
-- KEYS[2]  its soft bounces:    <ns>:soft-bounces:<tenant>:<address> sorted set of Unix days
-- KEYS[3]  the report's mark:   <ns>:applied:<event id>              (empty string: no dedupe)
-- ARGV[1]  kind: "soft" counts; any other suppresses
-- ARGV[2]  the value to store ("hard_bounce: 550 5.1.1 ...")
-- ARGV[3]  how long the suppression lasts, seconds; 0: until lifted
-- ARGV[4]  today (Unix day)            ARGV[5] soft bounces that suppress
-- ARGV[6]  ... within this many days   ARGV[7] the mark's TTL, seconds
-- Returns {outcome, soft bounces counted, the suppression's TTL in seconds after (-2: none,
-- -1: until lifted)}: outcome 1 newly suppressed, 2 extended, 0 nothing new (counted, or a
-- stronger suppression stands), -1 this report was applied already.
-- A suppression is never weakened: one until lifted stays so, a longer TTL is kept.

if KEYS[3] ~= '' and not redis.call('SET', KEYS[3], '1', 'NX', 'EX', tonumber(ARGV[7])) then
  return {-1, 0, redis.call('TTL', KEYS[1])}
end
local ttl = tonumber(ARGV[3])
local counted = 0
if ARGV[1] == 'soft' then
  local day = tonumber(ARGV[4])
  local window = tonumber(ARGV[6])
  redis.call('ZADD', KEYS[2], day, day)  -- one a day at most: the same day is the same member
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', day - window)
  redis.call('EXPIRE', KEYS[2], window * 86400)
  counted = redis.call('ZCARD', KEYS[2])
  if counted < tonumber(ARGV[5]) then
    return {0, counted, redis.call('TTL', KEYS[1])}
  end
  redis.call('DEL', KEYS[2])  -- suppressed: counting starts afresh when it ends
end
local current = redis.call('PTTL', KEYS[1])  -- -2: none, -1: until lifted
if current == -1 then
  return {0, counted, -1}
end
if ttl == 0 then
  redis.call('SET', KEYS[1], ARGV[2])
elseif current >= ttl * 1000 then
  return {0, counted, math.floor(current / 1000)}
else
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ttl)
end
local after = (ttl == 0) and -1 or ttl
if current == -2 then
  return {1, counted, after}
end
return {2, counted, after}
