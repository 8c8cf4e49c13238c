-- read_bands: XREADGROUP new entries from the band streams of one partition, highest band
-- first, until `count` entries are read: one round trip for what took one per band.
--
-- KEYS     the band streams, highest first (one partition: one cluster slot)
-- ARGV[1]  the consumer group
-- ARGV[2]  the consumer
-- ARGV[3]  count: the most entries to read in all
-- returns  {{stream, entries}, ...} for the streams that gave entries (entries as
--          XREADGROUP gives them), then {stream, error} for each stream whose read failed
--          (NOGROUP when its group is gone): what earlier reads took is never lost to an error
local want = tonumber(ARGV[3])
local read, failed = {}, {}
for _, key in ipairs(KEYS) do
  if want <= 0 then
    break
  end
  local reply = redis.pcall('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', want,
    'STREAMS', key, '>')
  if type(reply) == 'table' and reply.err then
    failed[#failed + 1] = {key, reply.err}
  elseif reply then
    local entries = reply[1][2]
    read[#read + 1] = {key, entries}
    want = want - #entries
  end
end
return {read, failed}
