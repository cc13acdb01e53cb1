-- Counts without reading members. ARGV: now. Returns {clients, users}.
clean(ARGV[1])
local users = 0
if KEYS[3] then users = redis.call('HLEN', KEYS[3]) end
return {redis.call('ZCOUNT', KEYS[2], '(' .. ARGV[1], '+inf'), users}
