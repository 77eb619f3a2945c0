-- Webhook Connect: the Redis Streams buffer's server-side logic.
-- Every script receives KEYS = {stream, config, stats, dead letters, connections, events,
-- history, attempts, groups} of one channel, then its own extra keys (KEYS[10] ...); they share a hash
-- tag, so they live in one Redis Cluster slot. Each script is this prelude followed by one
-- `-- script: NAME` section (see cloud/buffers/scripts.py), after a header of the constants it
-- shares with Python, written there at load time: RETRY_CONSUMER, EVENTS_KEPT, ATTEMPTS_KEPT,
-- LAG_COUNTED, BY_CONNECTION, and the codes of the error replies (CHANNEL_FULL, NO_CHANNEL,
-- NO_STREAM) that cloud/buffers/scripts.py maps to the project's exceptions.
local S, CFG, STATS, DLQ, CONNS = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local EVENTS, HISTORY, ATTEMPTS = KEYS[6], KEYS[7], KEYS[8]
-- GROUPS: group name -> when a connection of it was last alive (ms), for idle groups.
local GROUPS = KEYS[9]

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function id_parts(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end

local function id_less(a, b)
  local am, as = id_parts(a)
  local bm, bs = id_parts(b)
  return am < bm or (am == bm and as < bs)
end

local function fields_of(flat)
  local out = {}
  for i = 1, #flat, 2 do out[flat[i]] = flat[i + 1] end
  return out
end

-- The groups of the channel's stream; a channel without one (deleted, or never provisioned)
-- ends the script with NO_STREAM.
local function groups_of()
  if redis.call('EXISTS', S) == 0 then error({err = NO_STREAM}) end
  local out = {}
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', S)) do
    table.insert(out, fields_of(g))
  end
  return out
end

-- Messages below the floor are done for every group: acked, expired or dead-lettered.
-- Never trims anything a group still has to read or has in flight.
local function trim()
  local floor = nil
  for _, g in ipairs(groups_of()) do
    local gfloor
    if tonumber(g['pending']) > 0 then
      gfloor = redis.call('XPENDING', S, g['name'])[2]
    else
      local ms, seq = id_parts(g['last-delivered-id'])
      gfloor = ms .. '-' .. (seq + 1)
    end
    if floor == nil or id_less(gfloor, floor) then floor = gfloor end
  end
  if floor == nil then return 0 end
  return redis.call('XTRIM', S, 'MINID', floor)
end

-- The recent-activity feed: "<type> <ms> <message id> <consumer>", newest first.
local function event(kind, id, consumer)
  redis.call('LPUSH', EVENTS, kind .. ' ' .. now_ms() .. ' ' .. id .. ' ' .. (consumer or ''))
  redis.call('LTRIM', EVENTS, 0, EVENTS_KEPT - 1)
end

-- A failed delivery of a message in flight, from its pending entry {id, consumer, idle ms,
-- deliveries}: appended to the message's attempt log, kept (the latest ATTEMPTS_KEPT) until
-- it is acked, dead-lettered (the log goes with it) or expired. Entries as encode_attempts
-- in cloud/buffers/base.py writes them: {attempt, ms, connection, connector, outcome, ms}.
local function log_attempt(group, p, outcome, now)
  local field = group .. ' ' .. p[1]
  local raw = redis.call('HGET', ATTEMPTS, field)
  local log = raw and cjson.decode(raw) or {}
  local connector = ''
  local record = redis.call('HGET', CONNS, p[2])
  if record then
    local ok, fields = pcall(cjson.decode, record)
    if ok and type(fields.connector_id) == 'string' then connector = fields.connector_id end
  end
  local idle = tonumber(p[3])
  table.insert(log, {tonumber(p[4]), now - idle, p[2], connector, outcome, idle})
  while #log > ATTEMPTS_KEPT do table.remove(log, 1) end
  redis.call('HSET', ATTEMPTS, field, cjson.encode(log))
end

local function dead_letter(group, id, fields, attempts, reason, now)
  local field = group .. ' ' .. id
  local log = redis.call('HGET', ATTEMPTS, field) or '[]'
  redis.call('XADD', DLQ, '*', 'message_id', id, 'group', group, 'reason', reason,
    'attempts', attempts, 'dead_at', now, 'meta', fields['meta'], 'body', fields['body'],
    'attempts_log', log)
  redis.call('HDEL', ATTEMPTS, field)
  redis.call('XACK', S, group, id)
  redis.call('HINCRBY', STATS, 'dead_lettered', 1)
  event('dead_lettered', id)
end

-- Messages the group has not acked: in flight (or waiting to retry) plus unread. Redis knows
-- the unread count (lag) as long as the group's read counter is valid (housekeeping keeps it
-- so when it moves a group past expired messages). A group moved without it (by an earlier
-- version) is counted, at most LAG_COUNTED entries: this also runs for every refused append
-- of a full channel, and must stay cheap however large the channel.
local function backlog(g)
  local lag = g['lag']
  if type(lag) ~= 'number' then
    lag = #redis.call('XRANGE', S, '(' .. g['last-delivered-id'], '+', 'COUNT', LAG_COUNTED)
  end
  return tonumber(g['pending']) + lag
end

local function group_exists(name)
  if redis.call('EXISTS', S) == 0 then return false end
  for _, g in ipairs(groups_of()) do
    if g['name'] == name then return true end
  end
  return false
end

-- Connection records that name a group: {group = true}.
local function connected_groups()
  local out = {}
  for _, raw in ipairs(redis.call('HVALS', CONNS)) do
    local ok, record = pcall(cjson.decode, raw)
    if ok and type(record.group) == 'string' then out[record.group] = true end
  end
  return out
end

local function config()
  local c = redis.call('HMGET', CFG, 'max_queue_size', 'ttl_ms', 'ack_timeout_ms',
    'max_attempts', 'retry_delay_ms', 'history_ms')
  if not c[1] then return nil end
  return {
    max_queue_size = tonumber(c[1]), ttl_ms = tonumber(c[2]), ack_timeout_ms = tonumber(c[3]),
    max_attempts = tonumber(c[4]), retry_delay_ms = tonumber(c[5]),
    history_ms = tonumber(c[6] or '0'),
  }
end

-- script: append
-- ARGV: meta, body[, window ms]. Returns the id, or an error reply CHANNEL_FULL / NO_CHANNEL.
-- With KEYS[10] (an idempotency key) and a window: returns {id, 1} when it stored the message,
-- {original id, 0} when KEYS[10] names one stored within the window.
-- 'CHANNEL_FULL <limit> <group> <backlog>' names the group with the largest backlog.
local once = KEYS[10]
if once then
  local seen = redis.call('GET', once)
  if seen then return {seen, 0} end
end
local cfg = config()
if not cfg then return redis.error_reply(NO_CHANNEL) end
if redis.call('XLEN', S) >= cfg.max_queue_size then
  trim()
  if redis.call('XLEN', S) >= cfg.max_queue_size then
    local worst, most = '', -1
    for _, g in ipairs(groups_of()) do
      local n = backlog(g)
      if n > most then worst, most = g['name'], n end
    end
    return redis.error_reply(CHANNEL_FULL .. ' ' .. cfg.max_queue_size .. ' ' .. worst .. ' '
      .. most)
  end
end
local id = redis.call('XADD', S, '*', 'meta', ARGV[1], 'body', ARGV[2])
redis.call('HINCRBY', STATS, 'accepted', 1)
event('received', id)
if cfg.history_ms > 0 then
  -- A copy under the same id, trimmed (approximately, cheaply) to the history window.
  local cutoff = (id_parts(id) - cfg.history_ms) .. '-0'
  redis.call('XADD', HISTORY, 'MINID', '~', cutoff, id, 'meta', ARGV[1], 'body', ARGV[2])
end
if once then
  redis.call('SET', once, id, 'PX', ARGV[3])
  return {id, 1}
end
return id

-- script: join
-- ARGV: group, where a new group starts ('0': the first message, '$': the next one). Creates
-- the group (and the stream) unless it exists, and marks it alive now.
if not group_exists(ARGV[1]) then
  redis.call('XGROUP', 'CREATE', S, ARGV[1], ARGV[2], 'MKSTREAM')
end
redis.call('HSET', GROUPS, ARGV[1], now_ms())
return 1

-- script: hasgroup
-- ARGV: group. Returns 1 if the channel's stream has that group.
if group_exists(ARGV[1]) then return 1 end
return 0

-- script: read
-- ARGV: group, consumer, count. Returns {{id, attempts, meta, body}, ...}.
local group, consumer, count = ARGV[1], ARGV[2], tonumber(ARGV[3])
local cfg = config()
if not cfg then return redis.error_reply(NO_CHANNEL) end
local now = now_ms()
local cutoff = now - cfg.ttl_ms
local out = {}
local function offer(id, flat, attempts)
  local f = fields_of(flat)
  if id_parts(id) < cutoff then
    redis.call('XACK', S, group, id)
    redis.call('HDEL', ATTEMPTS, group .. ' ' .. id)
    redis.call('HINCRBY', STATS, 'expired', 1)
  elseif f['group'] and f['group'] ~= group then
    redis.call('XACK', S, group, id)  -- a replay meant for another group
  elseif attempts > cfg.max_attempts then
    dead_letter(group, id, f, attempts - 1, 'max_delivery_attempts', now)
  else
    if attempts > 1 then redis.call('HINCRBY', STATS, 'redelivered', 1) end
    table.insert(out, {id, attempts, f['meta'], f['body']})
  end
end
-- What is due again: a held message past its ack timeout (that attempt is logged), or one
-- nacked or released, which waits under RETRY_CONSUMER until its retry delay is over.
local due = redis.call('XPENDING', S, group, 'IDLE', cfg.ack_timeout_ms, '-', '+', count)
if #due > 0 then
  local ids, attempts = {}, {}
  for _, p in ipairs(due) do
    if p[2] ~= RETRY_CONSUMER then log_attempt(group, p, 'ack_timeout', now) end
    table.insert(ids, p[1])
    attempts[p[1]] = tonumber(p[4]) + 1
  end
  -- Entries gone from the stream are dropped from the group and not returned.
  for _, entry in ipairs(redis.call('XCLAIM', S, group, consumer, 0, unpack(ids))) do
    if entry and entry[2] then offer(entry[1], entry[2], attempts[entry[1]]) end
  end
end
if #out < count then
  local fresh = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', count - #out,
    'STREAMS', S, '>')
  if fresh then
    for _, entry in ipairs(fresh[1][2]) do offer(entry[1], entry[2], 1) end
  end
end
return out

-- script: ack
-- ARGV: group, id, consumer ('' for any). Returns 1 if the message was in flight.
local group, id, consumer = ARGV[1], ARGV[2], ARGV[3]
if consumer ~= '' then
  local p = redis.call('XPENDING', S, group, id, id, 1)
  if #p == 0 or p[1][2] ~= consumer then return 0 end
end
local n = redis.call('XACK', S, group, id)
if n == 1 then
  redis.call('HDEL', ATTEMPTS, group .. ' ' .. id)
  redis.call('HINCRBY', STATS, 'delivered', 1)
  if consumer ~= '' then redis.call('HINCRBY', STATS, BY_CONNECTION .. consumer, 1) end
  event('delivered', id, consumer)
end
return n

-- script: nack
-- ARGV: group, id, consumer ('' for any), retry ('1'/'0'), reason.
local group, id, consumer, retry, reason = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local cfg = config()
if not cfg then return 0 end
local p = redis.call('XPENDING', S, group, id, id, 1)
if #p == 0 or (consumer ~= '' and p[1][2] ~= consumer) then return 0 end
local now = now_ms()
-- (A message already waiting for its retry was nacked before: that attempt is logged.)
if p[1][2] ~= RETRY_CONSUMER then log_attempt(group, p[1], reason, now) end
if retry == '1' then
  -- Due again once its idle time reaches the ack timeout: that is, after the retry delay.
  local idle = math.max(cfg.ack_timeout_ms - cfg.retry_delay_ms, 0)
  redis.call('XCLAIM', S, group, RETRY_CONSUMER, 0, id, 'IDLE', idle, 'JUSTID')
else
  local entry = redis.call('XRANGE', S, id, id)[1]
  dead_letter(group, id, fields_of(entry[2]), tonumber(p[1][4]), reason, now)
end
return 1

-- script: release
-- ARGV: group, consumer. Makes everything the consumer holds due at once; returns how many.
local group, consumer = ARGV[1], ARGV[2]
local cfg = config()
local released = 0
while cfg do
  local p = redis.call('XPENDING', S, group, '-', '+', 1000, consumer)
  if #p == 0 then break end
  local now = now_ms()
  local args = {S, group, RETRY_CONSUMER, 0}
  for _, entry in ipairs(p) do
    log_attempt(group, entry, 'connection_closed', now)
    table.insert(args, entry[1])
  end
  table.insert(args, 'IDLE'); table.insert(args, cfg.ack_timeout_ms)
  table.insert(args, 'JUSTID')
  redis.call('XCLAIM', unpack(args))
  released = released + #p
end
pcall(redis.call, 'XGROUP', 'DELCONSUMER', S, group, consumer)
-- A connection of the group was alive until now: its idle time starts here.
if cfg then redis.call('HSET', GROUPS, group, now_ms()) end
return released

-- script: housekeep
-- Expires what is past the TTL for every group, then trims. Returns how many expired.
local cfg = config()
if not cfg then return 0 end
local cutoff = (now_ms() - cfg.ttl_ms) .. '-0'
local expired = 0
for _, g in ipairs(groups_of()) do
  local old = redis.call('XPENDING', S, g['name'], '-', '(' .. cutoff, 10000)
  for _, entry in ipairs(old) do
    expired = expired + redis.call('XACK', S, g['name'], entry[1])
  end
  if id_less(g['last-delivered-id'], cutoff) then
    local unread = redis.call('XRANGE', S, '(' .. g['last-delivered-id'], '(' .. cutoff,
      'COUNT', 10000)
    for _, entry in ipairs(unread) do
      local f = fields_of(entry[2])
      if not f['group'] or f['group'] == g['name'] then expired = expired + 1 end
    end
    if #unread > 0 then
      -- Skipping #unread entries: the group's read counter moves on as much, so Redis can
      -- still tell its lag (the backlog the admin API lists and a full channel names).
      local read = tonumber(g['entries-read'])
      if read then
        redis.call('XGROUP', 'SETID', S, g['name'], unread[#unread][1], 'ENTRIESREAD',
          read + #unread)
      else
        redis.call('XGROUP', 'SETID', S, g['name'], unread[#unread][1])
      end
    end
  end
end
if expired > 0 then redis.call('HINCRBY', STATS, 'expired', expired) end
-- Attempt logs of messages no longer in flight (expired, or their group deleted), a slice per
-- run: the cursor is kept in the config hash.
local scan = redis.call('HSCAN', ATTEMPTS, redis.call('HGET', CFG, 'attempts_cursor') or '0',
  'COUNT', 200)
for i = 1, #scan[2], 2 do
  local group, id = string.match(scan[2][i], '^(.*) (%d+%-%d+)$')
  local ok, p = pcall(redis.call, 'XPENDING', S, group or '', id or '0-0', id or '0-0', 1)
  if not ok or #p == 0 then redis.call('HDEL', ATTEMPTS, scan[2][i]) end
end
redis.call('HSET', CFG, 'attempts_cursor', scan[1])
if cfg.history_ms > 0 then
  redis.call('XTRIM', HISTORY, 'MINID', (now_ms() - cfg.history_ms) .. '-0')
else
  redis.call('DEL', HISTORY)
end
trim()
return expired

-- script: depth
-- Returns {retained, in flight, oldest id or false} after trimming.
trim()
local in_flight = 0
for _, g in ipairs(groups_of()) do in_flight = in_flight + tonumber(g['pending']) end
local first = redis.call('XRANGE', S, '-', '+', 'COUNT', 1)[1]
return {redis.call('XLEN', S), in_flight, first and first[1] or false}

-- script: connect
-- ARGV: connection id, record JSON, limit, stale ms. 1 if registered; 0 if limit connections
-- of the channel are live. Below the limit the hash's size says so at once (its stale records
-- only overstate it), so a connect costs O(1) however many connectors the channel has. At the
-- limit the records are read, stale ones dropped and live ones counted; a refusal keeps, in
-- the config hash, when the oldest live record could go stale ('conns_full_until'): until
-- then no record can be stale (records only get younger), so refusals cost no read either.
local now = now_ms()
local limit, stale = tonumber(ARGV[3]), tonumber(ARGV[4])
if redis.call('HLEN', CONNS) >= limit then
  if now < tonumber(redis.call('HGET', CFG, 'conns_full_until') or '0') then return 0 end
  local live, oldest = 0, now
  local all = redis.call('HGETALL', CONNS)
  for i = 1, #all, 2 do
    local seen = cjson.decode(all[i + 1]).seen_at * 1000
    if seen < now - stale then
      redis.call('HDEL', CONNS, all[i])
    else
      live = live + 1
      oldest = math.min(oldest, seen)
    end
  end
  if live >= limit then
    if redis.call('EXISTS', CFG) == 1 then
      redis.call('HSET', CFG, 'conns_full_until', string.format('%d', oldest + stale))
    end
    return 0
  end
end
local record = cjson.decode(ARGV[2])
record.seen_at = now / 1000
redis.call('HSET', CONNS, ARGV[1], cjson.encode(record))
return 1

-- script: touch
-- ARGV: connection id. 1 if the connection is still registered.
local raw = redis.call('HGET', CONNS, ARGV[1])
if not raw then return 0 end
local record = cjson.decode(raw)
record.seen_at = now_ms() / 1000
redis.call('HSET', CONNS, ARGV[1], cjson.encode(record))
return 1

-- script: hit
-- Fixed-window rate counter. KEYS[10]: the counter; ARGV: window ms.
-- Returns {hits in this window, ms until it ends}.
local window = tonumber(ARGV[1])
local t = now_ms()
local key = KEYS[10] .. ':' .. math.floor(t / window)
local hits = redis.call('INCR', key)
if hits == 1 then redis.call('PEXPIRE', key, window + 1000) end
return {hits, window - t % window}

-- script: groups
-- Returns {{name, backlog, in flight, oldest id or false, last seen ms or false}, ...}.
local out = {}
for _, g in ipairs(groups_of()) do
  local oldest = false
  if tonumber(g['pending']) > 0 then oldest = redis.call('XPENDING', S, g['name'])[2] end
  local unread = redis.call('XRANGE', S, '(' .. g['last-delivered-id'], '+', 'COUNT', 1)[1]
  if unread and (not oldest or id_less(unread[1], oldest)) then oldest = unread[1] end
  table.insert(out, {g['name'], backlog(g), tonumber(g['pending']), oldest,
    redis.call('HGET', GROUPS, g['name']) or false})
end
return out

-- script: dropgroup
-- ARGV: group, the default group's name. Forgets the group with its backlog and removes its
-- connection records (their heartbeats close them); the default group comes back at once,
-- empty. Returns how many connections were removed, or -1 if there was no such group.
local group = ARGV[1]
local found = false
for _, g in ipairs(groups_of()) do
  if g['name'] == group then found = true end
end
if not found then return -1 end
redis.call('XGROUP', 'DESTROY', S, group)
redis.call('HDEL', GROUPS, group)
local removed = 0
local all = redis.call('HGETALL', CONNS)
for i = 1, #all, 2 do
  local ok, record = pcall(cjson.decode, all[i + 1])
  if ok and record.group == group then
    redis.call('HDEL', CONNS, all[i])
    redis.call('HDEL', STATS, BY_CONNECTION .. all[i])
    removed = removed + 1
  end
end
if group == ARGV[2] then
  redis.call('XGROUP', 'CREATE', S, group, '$')
  redis.call('HSET', GROUPS, group, now_ms())
end
trim()
return removed

-- script: idlegroups
-- ARGV: idle ms, the default group's name. Drops every other group without a connection
-- record whose last sign of life is older than idle ms; returns their names.
local now = now_ms()
local connected = connected_groups()
local dropped = {}
for _, g in ipairs(groups_of()) do
  local name = g['name']
  if name ~= ARGV[2] and not connected[name] then
    local seen = redis.call('HGET', GROUPS, name)
    if not seen then
      redis.call('HSET', GROUPS, name, now)  -- a group from before this was kept
    elseif now - tonumber(seen) > tonumber(ARGV[1]) then
      redis.call('XGROUP', 'DESTROY', S, name)
      redis.call('HDEL', GROUPS, name)
      table.insert(dropped, name)
    end
  end
end
if #dropped > 0 then trim() end
return dropped
