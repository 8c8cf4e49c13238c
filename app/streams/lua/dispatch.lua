-- dispatch: add job ids to one stream while it holds fewer than `maxlen` entries.
--
-- KEYS[1]  the stream (entries are only live work: finished entries are XACKed and XDELed)
-- ARGV[1]  maxlen: the stream bound; ids that do not fit stay undispatched in Postgres and
--          are sent later by the dispatcher, so the bound never drops a job
-- ARGV[2…] job ids, in order
-- returns  the entry ids added, one per job id added (always for a prefix of ARGV[2…])
local room = tonumber(ARGV[1]) - redis.call('XLEN', KEYS[1])
local added = {}
for i = 2, #ARGV do
  if #added >= room then
    break
  end
  added[#added + 1] = redis.call('XADD', KEYS[1], '*', 'job', ARGV[i])
end
return added
