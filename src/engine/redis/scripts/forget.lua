-- Shared by the scripts that read expiring entries: drops up to 1000 expired
-- entries (bounded, so a crashed node's many entries never block Redis long)
-- and keeps the per-user counts and the id index in step.
-- KEYS: data, exp, [users, ids]; ARGV[1]: now.
local function forget(id)
  local v = redis.call('HGET', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
  if KEYS[4] then redis.call('ZREM', KEYS[4], id) end
  if not v then return 0 end
  redis.call('HDEL', KEYS[1], id)
  if KEYS[3] then
    local u = cjson.decode(v)['user']
    if redis.call('HINCRBY', KEYS[3], u, -1) <= 0 then redis.call('HDEL', KEYS[3], u) end
  end
  return 1
end
local function clean(now)
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 1000)) do
    forget(id)
  end
end
