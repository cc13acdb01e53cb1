-- Moves cursors forward only. KEYS: cursor hash, devices set. ARGV: ttl ms,
-- device, then channel/seq/epoch triples (epoch `""` when unknown). Seqs compare
-- as decimal strings, so every u64 is exact (Lua numbers are doubles). A seq of
-- another stream incarnation than the stored one replaces it (seqs restart).
-- The epoch is kept in the field `<channel> epoch` (no channel has a space).
local function greater(a, b)
  if #a ~= #b then return #a > #b end
  return a > b
end
for i = 3, #ARGV, 3 do
  local ch, seq, ep = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local efield = ch .. ' epoch'
  local cur = redis.call('HGET', KEYS[1], ch)
  local cur_ep = redis.call('HGET', KEYS[1], efield)
  if ep ~= '' and cur_ep and cur_ep ~= ep then
    redis.call('HSET', KEYS[1], ch, seq, efield, ep)
  elseif not cur or greater(seq, cur) then
    redis.call('HSET', KEYS[1], ch, seq)
    if ep ~= '' then redis.call('HSET', KEYS[1], efield, ep) end
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return 1
