-- The cursor store's generation: `"<id> <created_ms> <lost>"`. KEYS: the
-- generation key. ARGV: a new id, now (ms), the id this node knew (`""` if none).
-- Creates the generation when it is missing (lost = 1 when the node knew one,
-- i.e. Redis lost its data), and marks a generation lost when a node that knew
-- another one meets it. Returns the generation.
local g = redis.call('GET', KEYS[1])
if not g then
  local lost = '0'
  if ARGV[3] ~= '' then lost = '1' end
  g = ARGV[1] .. ' ' .. ARGV[2] .. ' ' .. lost
  redis.call('SET', KEYS[1], g)
  return g
end
local id = string.match(g, '^(%S+)')
if ARGV[3] ~= '' and id ~= ARGV[3] and string.sub(g, -1) == '0' then
  g = string.sub(g, 1, -2) .. '1'
  redis.call('SET', KEYS[1], g)
end
return g
