-- Adds or refreshes an entry. ARGV: id, json, expiry ms, key ttl ms, user.
local new = redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
if KEYS[3] and new == 1 then redis.call('HINCRBY', KEYS[3], ARGV[5], 1) end
if KEYS[4] then redis.call('ZADD', KEYS[4], 0, ARGV[1]) end
for i = 1, #KEYS do redis.call('PEXPIRE', KEYS[i], ARGV[4]) end
return new
