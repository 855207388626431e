-- priority.lua: may these tenants' high-priority mails go ahead of the line? Atomic, Redis TIME.
-- Each tenant has an allowance per server for transactional mail: a GCRA at a share of the
-- server's rate (limiter/gcra.py, `ration_high`). All of a batch's tenants must have room;
-- then each takes its mails from its allowance. Otherwise nothing is taken and the batch
-- waits in line as normal mail.
--
-- KEYS[i]  {<namespace>:<server>}:high:<tenant>   hash: tat (us)
-- ARGV[1] interval_us: us per high mail at the share   ARGV[2] burst   ARGV[3..] mails per tenant
-- Returns 1 (ahead of the line) or 0 (as normal mail).

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local tats = {}
for i = 1, #KEYS do
  local n = tonumber(ARGV[2 + i])
  local tat = math.max(tonumber(redis.call('HGET', KEYS[i], 'tat')) or 0, now)
  if n > burst or tat + n * interval - burst * interval > now then return 0 end
  tats[i] = tat + n * interval
end
for i = 1, #KEYS do
  redis.call('HSET', KEYS[i], 'tat', string.format('%d', tats[i]))
  redis.call('PEXPIRE', KEYS[i], math.floor((tats[i] - now) / 1000) + 1000)
end
return 1
