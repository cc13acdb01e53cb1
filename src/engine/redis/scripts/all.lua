-- Every live entry of a small set (a user's connections, the nodes). ARGV: now.
clean(ARGV[1])
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[1], '+inf')) do
  local v = redis.call('HGET', KEYS[1], id)
  if v then table.insert(out, v) end
end
return out
