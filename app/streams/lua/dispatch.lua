-- dispatch: add job ids to one stream while it holds fewer than `maxlen` entries.
--
-- KEYS[1]  the stream (entries are only live work: finished entries are XACKed and XDELed)
-- ARGV[1]  maxlen: the stream bound; ids that do not fit stay undispatched in Postgres and
--          are sent later by the dispatcher, so the bound never drops a job
-- ARGV[2…] job ids, in order; "<id> <traceparent>" adds the trace context (field `tp`)
-- returns  the entry ids added, one per job id added (always for a prefix of ARGV[2…])
local room = tonumber(ARGV[1]) - redis.call('XLEN', KEYS[1])
local added = {}
for i = 2, #ARGV do
  if #added >= room then
    break
  end
  local arg = ARGV[i]
  local space = string.find(arg, ' ', 1, true)
  if space then
    added[#added + 1] = redis.call(
      'XADD', KEYS[1], '*', 'job', string.sub(arg, 1, space - 1), 'tp', string.sub(arg, space + 1))
  else
    added[#added + 1] = redis.call('XADD', KEYS[1], '*', 'job', arg)
  end
end
return added
