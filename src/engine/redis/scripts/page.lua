-- Up to `count` ids after `after` in id order, with the live ones' entries.
-- ARGV: now, after ('' for the start), count. Returns {last id examined or '', json...}.
clean(ARGV[1])
local from = '-'
if ARGV[2] ~= '' then from = '(' .. ARGV[2] end
local ids = redis.call('ZRANGE', KEYS[4], from, '+', 'BYLEX', 'LIMIT', 0, tonumber(ARGV[3]))
local out = {''}
if #ids == tonumber(ARGV[3]) then out[1] = ids[#ids] end
for _, id in ipairs(ids) do
  local s = redis.call('ZSCORE', KEYS[2], id)
  if s and tonumber(s) > tonumber(ARGV[1]) then
    local v = redis.call('HGET', KEYS[1], id)
    if v then table.insert(out, v) end
  end
end
return out
