-- A report (hard bounce or complaint) of one tenant, weighed against its last sends on the
-- platform's servers; warn or pause when its ratios pass the thresholds.
--
-- KEYS[1]  <ns>:reputation:<tenant>  hash: sends (all time), b:<bucket>, c:<bucket> (reports
--          while that bucket of sends was the latest), state (ok, warned, paused)
-- KEYS[2]  <ns>:reputation:paused    hash: tenant -> JSON {reason, since_ms, bounce_ratio, complaint_ratio}
-- KEYS[3]  the report's mark (empty string: no dedupe)
-- ARGV     tenant, kind ("bounce" | "complaint"), window sends, minimum sends, warn bounce,
--          pause bounce, warn complaint, pause complaint, now ms, mark TTL s
-- Returns {state before, state after, bounce ratio, complaint ratio, sends in the window}, the
-- ratios as strings; state before "duplicate" when the report was counted already.
-- The window is ten buckets of window/10 sends: the last 900 to 1,000 sends. A paused tenant
-- stays paused until `mailpipe tenants resume`, which deletes KEYS[1] too (a fresh window).

if KEYS[3] ~= '' and not redis.call('SET', KEYS[3], '1', 'NX', 'EX', tonumber(ARGV[10])) then
  return {'duplicate', redis.call('HGET', KEYS[1], 'state') or 'ok', '0', '0', 0}
end
local window = tonumber(ARGV[3])
local size = math.max(1, math.floor(window / 10))
local sends = tonumber(redis.call('HGET', KEYS[1], 'sends') or '0')
local bucket = math.floor(sends / size)
local field = (ARGV[2] == 'complaint') and 'c:' or 'b:'
redis.call('HINCRBY', KEYS[1], field .. bucket, 1)
redis.call('HDEL', KEYS[1], 'b:' .. (bucket - 10), 'c:' .. (bucket - 10))
local bounces, complaints = 0, 0
for b = bucket - 9, bucket do
  bounces = bounces + tonumber(redis.call('HGET', KEYS[1], 'b:' .. b) or '0')
  complaints = complaints + tonumber(redis.call('HGET', KEYS[1], 'c:' .. b) or '0')
end
local in_window = math.max(1, sends - math.max(0, (bucket - 9) * size))
local bounce_ratio = bounces / in_window
local complaint_ratio = complaints / in_window
local before = redis.call('HGET', KEYS[1], 'state') or 'ok'
local after = 'ok'
if in_window >= tonumber(ARGV[4]) then
  if bounce_ratio >= tonumber(ARGV[6]) or complaint_ratio >= tonumber(ARGV[8]) then
    after = 'paused'
  elseif bounce_ratio >= tonumber(ARGV[5]) or complaint_ratio >= tonumber(ARGV[7]) then
    after = 'warned'
  end
end
if before == 'paused' then
  after = 'paused'
elseif after == 'paused' then
  local why = string.format('%.1f%% hard bounces, %.2f%% complaints over its last %d sends on shared servers',
    bounce_ratio * 100, complaint_ratio * 100, in_window)
  redis.call('HSET', KEYS[2], ARGV[1], cjson.encode({reason = why, since_ms = tonumber(ARGV[9]),
    bounce_ratio = bounce_ratio, complaint_ratio = complaint_ratio}))
end
redis.call('HSET', KEYS[1], 'state', after)
redis.call('EXPIRE', KEYS[1], 90 * 86400)
return {before, after, tostring(bounce_ratio), tostring(complaint_ratio), in_window}
