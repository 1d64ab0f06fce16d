"""The Lua scripts: every change that touches several keys is one of them.

Each script receives ``KEYS[1]`` (a key of the namespace, so that Redis Cluster
routes it to the namespace's slot) and ``ARGV[1]``, the namespace's key prefix;
every key it builds starts with that prefix, so it lives in the same slot.

Key layout under the prefix ``P`` (``sq:{<namespace>}:``), ids being raw suffixes
after a type tag that contains no ``:`` (so no id can spell another key):

=====================  ======  =========================================================
key                    type    holds
=====================  ======  =========================================================
``P layout``           string  the layout of the namespace's keys: :data:`LAYOUT`
``P seq / tok / qn``   string  counters: enqueue order, claim tokens, sender queue numbers
``P mg:<mailing>``     hash    sender -> sender queue number
``P frozen``           set     mailings frozen as a whole (later sender queues start frozen)
``P q:<n>``            hash    a sender queue: mailing, sender, frozen flag, clear epoch,
                               the counters, and the time each epoch was cleared
``P z:<n>``            zset    its NEW and RETRIES messages of this epoch, scored by next
                               attempt time; member = 16-digit enqueue seq, state, attempts,
                               then id, recipient and mail_from, each after a newline
``P zc:<n>:<epoch>``   zset    what a clear left behind (for purge), renamed from ``z:``
``P cleared``          zset    ``<n>:<epoch>`` by clear time
``P sq:<sender>``      set     the sender's queue numbers
``P c``                hash    SENDING messages: id -> ``token:queue:claimed from:attempts:
                               claimed at``; a message is SENDING exactly while it is here
``P l:<sender>``       zset    the sender's valid leases: message id by expiry time
``P senders``          set     senders with queues (``expire_leases`` walks them)
``P m:<id>``           hash    a message as it was last queued or ended (not while SENDING)
``P b:<seq>``          string  a message's content, by its enqueue seq
``P done``             zset    batches of terminal messages by the time they became terminal
``P dl:<n> / dn``      list    a batch's message ids / string: the batch counter
=====================  ======  =========================================================
"""

from __future__ import annotations

import hashlib
from typing import Final

import attrs

from senderqueue import LIFECYCLE, State, Trigger

__all__ = ["CODES", "LAYOUT", "SCRIPTS", "STATES", "LuaScript"]

LAYOUT: Final = 2
"""The layout of the keys below; a namespace written in another one is refused, never misread.

Layout 1 (no ``layout`` key) kept contents in the message hashes and had no claims hash ``c``.
"""

CODES: Final = {
    State.NEW: "n",
    State.RETRIES: "r",
    State.SENDING: "s",
    State.FROZEN: "z",
    State.DELIVERED: "d",
    State.FAILED: "f",
    State.DELETED: "x",
}
"""How a state is spelt in Redis (one byte keeps message hashes small)."""
STATES: Final = {code: state for state, code in CODES.items()}


def _lua_set(states: frozenset[State]) -> str:
    return "{" + ", ".join(f"{code} = true" for code in sorted(CODES[s] for s in states)) + "}"


def _lifecycle_tables() -> str:
    """The moves out of SENDING and the claimable states, read from the core's LIFECYCLE."""
    leave = ",\n  ".join(
        f"{trigger.value} = {_lua_set(LIFECYCLE[trigger][State.SENDING])}"
        for trigger in (
            Trigger.DELIVER,
            Trigger.SOFT_BOUNCE,
            Trigger.HARD_BOUNCE,
            Trigger.RELEASE,
            Trigger.EXPIRE,
        )
    )
    claimable = {s for s, dests in LIFECYCLE[Trigger.CLAIM].items() if State.SENDING in dests and s}
    return f"local LEAVE = {{\n  {leave}\n}}\nlocal CLAIMABLE = {_lua_set(frozenset(claimable))}\n"


# The prelude is split so that each script carries only the functions it calls: Redis runs a
# script's whole text on every call, and each function defined costs a closure.
_BASE = r"""
local P = ARGV[1]
local function I(x) return string.format('%d', x) end
local function qkey(qid) return P .. 'q:' .. qid end
local function zkey(qid) return P .. 'z:' .. qid end
local function mkey(id) return P .. 'm:' .. id end
-- Content is keyed by the enqueue seq, which no other message ever has: a claim can read it after
-- its script, and a key it finds is its own message's.
local function bkey(seq) return P .. 'b:' .. seq end
local function lkey(sender) return P .. 'l:' .. sender end
-- A queued message's member in its queue's sorted set: its 16-digit enqueue seq (so equal times
-- order by enqueue order), its state and attempts, then its id, recipient and mail_from, each after
-- a newline (none of them may hold one). A claim takes what it returns of a message from its
-- member and its score, and never reads the message hash.
local function member(seq, state, attempts, id, recipient, mail_from)
  return table.concat({string.format('%016d', seq) .. state .. attempts, id, recipient, mail_from}, '\n')
end
-- seq, state, attempts, id, recipient, mail_from of a member
local function parse_member(m)
  local seq, state, attempts, id, recipient, mail_from =
    string.match(m, '^(%d+)(%a)(%d+)\n([^\n]*)\n([^\n]*)\n(.*)$')
  return tonumber(seq), state, tonumber(attempts), id, recipient, mail_from
end
local function in_chunks(command, key, items)
  for i = 1, #items, 1000 do
    redis.call(command, key, unpack(items, i, math.min(i + 999, #items)))
  end
end
"""

_QUEUE_OF = r"""
-- The sender queue (mailing, sender), made if asked: it starts frozen if its mailing is.
local function queue_of(mailing, sender, now, create)
  local qid = redis.call('HGET', P .. 'mg:' .. mailing, sender)
  if qid or not create then return qid end
  qid = I(redis.call('INCR', P .. 'qn'))
  local frozen = redis.call('SISMEMBER', P .. 'frozen', mailing)
  redis.call('HSET', P .. 'mg:' .. mailing, sender, qid)
  redis.call('HSET', qkey(qid), 'm', mailing, 's', sender, 'fz', frozen, 'ch', now, 'ep', 0,
             'n', 0, 'r', 0, 'sd', 0, 'd', 0, 'f', 0, 'x', 0)
  redis.call('SADD', P .. 'sq:' .. sender, qid)
  redis.call('SADD', P .. 'senders', sender)
  return qid
end
"""

_SETTLING = r"""
-- HMGET of any number of fields: Lua unpacks at most about 8000 values at once.
local function hmget(key, fields)
  if #fields <= 1000 then return redis.call('HMGET', key, unpack(fields)) end
  local values = {}
  for i = 1, #fields, 1000 do
    local part = redis.call('HMGET', key, unpack(fields, i, math.min(i + 999, #fields)))
    for j = 1, #part do values[#values + 1] = part[j] end
  end
  return values
end

-- RetryPolicy, from ARGV[i .. i+5]: min_backoff, max_backoff (us), max_attempts,
-- max_lifetime (us), jitter, seed: the same arithmetic as senderqueue._retry.
local function policy_at(i)
  return {min = tonumber(ARGV[i]), max = tonumber(ARGV[i + 1]), attempts = tonumber(ARGV[i + 2]),
          life = tonumber(ARGV[i + 3]), jitter = tonumber(ARGV[i + 4]), seed = ARGV[i + 5]}
end

local function round_half_even(x)
  local r = math.floor(x)
  local diff = x - r
  if diff > 0.5 or (diff == 0.5 and r % 2 == 1) then r = r + 1 end
  return r
end

local function backoff(policy, attempts, id)
  local exponent = math.min(math.max(attempts - 1, 0), 1000)
  local base
  -- Compared in seconds like the core, so both cap at the same attempt.
  if (policy.min / 1e6) * 2 ^ exponent >= policy.max / 1e6 then
    base = policy.max
  else
    base = policy.min * 2 ^ exponent
  end
  if policy.jitter == 0 then return base end
  local digest = redis.sha1hex(policy.seed .. ':' .. id .. ':' .. I(attempts))
  local draw = tonumber(string.sub(digest, 1, 8), 16) / 4294967296
  return round_half_even(base * (1 - policy.jitter + 2 * policy.jitter * draw))
end

local function exhausted(policy, attempts, created, now)
  return attempts >= policy.attempts or now - created >= policy.life
end

local now_text = ARGV[2]  -- every settling script takes now (us) as ARGV[2]

-- Writes that many messages share, gathered during a script and made once at its end by flush():
-- counter deltas per sender queue, lease removals per sender, claims ended, new terminal
-- messages (which all became terminal at now: they are kept for purge as one batch, a list,
-- filed by that time).
local deltas, unleased, ended, finished = {}, {}, {}, {}
local function count(qid, field, n)
  local d = deltas[qid]
  if not d then d = {}; deltas[qid] = d end
  d[field] = (d[field] or 0) + n
end
local function flush()
  for qid, d in pairs(deltas) do
    for field, n in pairs(d) do
      if n ~= 0 then redis.call('HINCRBY', qkey(qid), field, n) end
    end
  end
  for sender, ids in pairs(unleased) do in_chunks('ZREM', lkey(sender), ids) end
  if #ended > 0 then in_chunks('HDEL', P .. 'c', ended) end
  if #finished > 0 then
    local batch = redis.call('INCR', P .. 'dn')
    in_chunks('RPUSH', P .. 'dl:' .. batch, finished)
    redis.call('ZADD', P .. 'done', now_text, batch)
  end
  deltas, unleased, ended, finished = {}, {}, {}, {}
end

-- What a settling script needs of a sender queue (clear epoch, frozen flag, sender); neither the
-- flag nor the epoch changes during it.
local queue_cache = {}
local function queue_state(qid)
  local q = queue_cache[qid]
  if not q then
    q = redis.call('HMGET', qkey(qid), 'ep', 'fz', 's')
    queue_cache[qid] = q
  end
  return q
end

-- A claim record (the value in P c): token, sender queue, claimed from, attempts, claimed at.
local function parse_claim(record)
  local token, qid, from, attempts = string.match(record, '^(%d+):(%d+):(%a):(%d+):')
  return token, qid, from, tonumber(attempts)
end

-- The SENDING message `id`, whose claim record says (qid, from, attempts), leaves by `trigger`,
-- with the precedence of _lifecycle.leave_sending. A verdict (deliver, hard_bounce) needs nothing
-- more of the message; the other triggers read what decides their way in one more call.
local function leave(id, qid, from, attempts, trigger, err, now, policy)
  local q = queue_state(qid)
  local mk = mkey(id)
  local dest, back, due, seq, retry_at, recipient, mail_from
  if trigger == 'deliver' then
    dest = 'd'
  elseif trigger == 'hard_bounce' then
    dest = 'f'
  else
    local r = redis.call('HMGET', mk, 'ca', 'e', 'sq', 'na', 'rc', 'mf')
    local retried = trigger ~= 'release'
    if not retried then
      attempts = attempts - 1  -- a release does not count the attempt
      err = false  -- nor does it record an error (so a NEW message never has one)
    end
    if r[2] ~= q[1] then
      dest = 'x'  -- cleared since its claim
    elseif retried and exhausted(policy, attempts, tonumber(r[1]), now) then
      dest = 'f'
    else
      due, seq, recipient, mail_from = r[4], tonumber(r[3]), r[5], r[6]
      if retried then
        back = 'r'
        due = I(now + backoff(policy, attempts, id))
        retry_at = due
      else
        back = from
      end
      dest = q[2] == '1' and 'z' or back
    end
  end
  if not LEAVE[trigger][dest] then
    error('senderqueue: ' .. trigger .. ' cannot move SENDING to ' .. dest)
  end
  local gone = unleased[q[3]]
  if not gone then gone = {}; unleased[q[3]] = gone end
  gone[#gone + 1] = id
  ended[#ended + 1] = id
  count(qid, 'sd', -1)
  if back then
    count(qid, back, 1)
    redis.call('ZADD', zkey(qid), due, member(seq, back, attempts, id, recipient, mail_from))
    dest = back  -- FROZEN is derived from the queue's flag
  else
    count(qid, dest, 1)
    finished[#finished + 1] = id
  end
  if retry_at and err then
    redis.call('HSET', mk, 'st', dest, 'a', attempts, 'ua', now_text, 'na', retry_at, 'le', err)
  elseif retry_at then
    redis.call('HSET', mk, 'st', dest, 'a', attempts, 'ua', now_text, 'na', retry_at)
  elseif err then
    redis.call('HSET', mk, 'st', dest, 'a', attempts, 'ua', now_text, 'le', err)
  else
    redis.call('HSET', mk, 'st', dest, 'a', attempts, 'ua', now_text)
  end
end

-- Settle up to `bound` of the sender's expired leases; returns how many it settled.
local function expire_some(sender, now, policy, bound)
  local ids = redis.call('ZRANGEBYSCORE', lkey(sender), '-inf', now, 'LIMIT', 0, bound)
  if #ids == 0 then return 0 end
  local records = hmget(P .. 'c', ids)
  for i, id in ipairs(ids) do
    local _, qid, from, attempts = parse_claim(records[i])
    leave(id, qid, from, attempts, 'expire', 'lease expired', now, policy)
  end
  return #ids
end
"""

_ENQUEUE = r"""
-- ARGV: P, now, count, then per message: id, mailing, sender, recipient, mail_from, content
local now, count = ARGV[2], tonumber(ARGV[3])
local seen = {}
for i = 0, count - 1 do
  local id = ARGV[4 + i * 6]
  if seen[id] or redis.call('EXISTS', mkey(id)) == 1 then return {'dup', id} end
  seen[id] = true
end
local seq = redis.call('INCRBY', P .. 'seq', count) - count
local queues, added = {}, {}
for i = 0, count - 1 do
  local base = 4 + i * 6
  local id, mailing, sender = ARGV[base], ARGV[base + 1], ARGV[base + 2]
  local cell = mailing .. '\0' .. sender
  local q = queues[cell]
  if not q then
    local qid = queue_of(mailing, sender, now, true)
    q = {qid, redis.call('HGET', qkey(qid), 'ep')}
    queues[cell] = q
    added[qid] = 0
  end
  seq = seq + 1
  local recipient, mail_from = ARGV[base + 3], ARGV[base + 4]
  redis.call('HSET', mkey(id), 'q', q[1], 'rc', recipient, 'mf', mail_from, 'st', 'n', 'a', 0,
             'na', now, 'sq', I(seq), 'e', q[2], 'ca', now, 'ua', now)
  redis.call('SET', bkey(I(seq)), ARGV[base + 5])
  redis.call('ZADD', zkey(q[1]), now, member(seq, 'n', 0, id, recipient, mail_from))
  added[q[1]] = added[q[1]] + 1
end
for qid, n in pairs(added) do redis.call('HINCRBY', qkey(qid), 'n', n) end
return {'ok'}
"""

_CLAIM = r"""
-- ARGV: P, now, sender, limit, expires_at, policy (6), bound: first settle up to that many of the
-- sender's expired leases (0: none). Returns -1 if it settled `bound` of them and claimed nothing
-- (call it again), else 10 fields per claimed message. Its content is read by the caller natively
-- (MGET of the keys the seqs name), which costs Redis far less than carrying it through Lua.
local now, sender, limit, expires_at = tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4]), ARGV[5]
local bound = tonumber(ARGV[12])
if bound > 0 then
  local settled = expire_some(sender, now, policy_at(6), bound)
  -- Written before claiming: a lease settled back to a queue with a zero wait is due now, and a
  -- flush after its new claim would delete that claim's record and lease.
  flush()
  if settled == bound then return -1 end
end
local members, scores, queues = {}, {}, {}  -- what to take, oldest first
local lists, names = {}, {}
for _, qid in ipairs(redis.call('SMEMBERS', P .. 'sq:' .. sender)) do
  local q = redis.call('HMGET', qkey(qid), 'fz', 'm')
  if q[1] == '0' then
    local due = redis.call('ZRANGEBYSCORE', zkey(qid), '-inf', now, 'WITHSCORES', 'LIMIT', 0, limit)
    if #due > 0 then lists[#lists + 1] = {qid, due}; names[qid] = q[2] end
  end
end
if #lists == 1 then
  local qid, due = lists[1][1], lists[1][2]
  for j = 1, #due, 2 do
    members[#members + 1] = due[j]; scores[#scores + 1] = due[j + 1]; queues[#queues + 1] = qid
  end
elseif #lists > 1 then
  -- Merge the queues' heads: next attempt time, then enqueue order (the member's fixed-width prefix).
  local candidates = {}
  for _, list in ipairs(lists) do
    local due = list[2]
    for j = 1, #due, 2 do
      candidates[#candidates + 1] = {tonumber(due[j + 1]), due[j], list[1], due[j + 1]}
    end
  end
  table.sort(candidates, function(a, b) return a[1] < b[1] or (a[1] == b[1] and a[2] < b[2]) end)
  for i = 1, math.min(limit, #candidates) do
    local c = candidates[i]
    members[i] = c[2]; scores[i] = c[4]; queues[i] = c[3]
  end
end
local taken = #members
if taken == 0 then flush(); return {} end
-- Check every member before writing anything, so a broken invariant changes nothing.
local parsed = {}
for i = 1, taken do
  local seq, state, attempts, id, recipient, mail_from = parse_member(members[i])
  if not CLAIMABLE[state] then
    return redis.error_reply('senderqueue: cannot claim a message in ' .. tostring(state))
  end
  parsed[i] = {seq, state, attempts, id, recipient, mail_from}
end
local token = redis.call('INCRBY', P .. 'tok', taken) - taken
local out, records, leases, heads = {}, {}, {}, {}
for i = 1, taken do
  local m, qid = parsed[i], queues[i]
  local seq, state, id = m[1], m[2], m[4]
  local attempts = m[3] + 1
  local token_text = I(token + i)
  -- The message hash is left as it was: the claim record says it is SENDING.
  records[2 * i - 1] = id
  records[2 * i] = token_text .. ':' .. qid .. ':' .. state .. ':' .. attempts .. ':' .. ARGV[2]
  leases[2 * i - 1] = expires_at
  leases[2 * i] = id
  -- What a queue gives is always its first members, so they are removed by rank below.
  heads[qid] = (heads[qid] or 0) + 1
  count(qid, state, -1)
  local o = 10 * (i - 1)
  out[o + 1] = id
  out[o + 2] = names[qid]
  out[o + 3] = seq  -- names its content key
  out[o + 4] = attempts
  out[o + 5] = scores[i]  -- its next attempt time is its score
  out[o + 6] = m[5]
  out[o + 7] = m[6]
  if state == 'n' then
    -- A NEW message was never attempted (a release records no error) and waits for the time
    -- it was enqueued at (a release keeps it).
    out[o + 8] = false
    out[o + 9] = scores[i]
  else
    local r = redis.call('HMGET', mkey(id), 'le', 'ca')
    out[o + 8] = r[1]
    out[o + 9] = r[2]
  end
  out[o + 10] = token_text
end
for qid, k in pairs(heads) do
  redis.call('ZREMRANGEBYRANK', zkey(qid), 0, k - 1)
  count(qid, 'sd', k)
end
in_chunks('HSET', P .. 'c', records)
in_chunks('ZADD', lkey(sender), leases)
flush()
return out
"""

_SETTLE = r"""
-- ARGV: P, now, policy (6), then per claim: id, token, trigger, error ('' for none, else '=' .. error)
local now = tonumber(ARGV[2])
local policy = policy_at(3)
local ids = {}
for i = 9, #ARGV, 4 do ids[#ids + 1] = ARGV[i] end
local records = hmget(P .. 'c', ids)
local out, settled = {}, {}
for j, id in ipairs(ids) do
  local i = 5 + 4 * j
  local record = records[j]
  out[j] = 1
  if record and not settled[id] then
    local token, qid, from, attempts = parse_claim(record)
    if token == ARGV[i + 1] then
      local err = ARGV[i + 3]
      leave(id, qid, from, attempts, ARGV[i + 2], err ~= '' and string.sub(err, 2) or false, now, policy)
      settled[id] = true  -- the same claim twice in one report: the second one meets LeaseLost
      out[j] = 0
    end
  end
end
flush()
return out
"""

_RENEW = r"""
-- ARGV: P, id, token, expires_at
local id, token, expires_at = ARGV[2], ARGV[3], ARGV[4]
local record = redis.call('HGET', P .. 'c', id)
if not record then return 0 end
local held, qid = string.match(record, '^(%d+):(%d+):')
if held ~= token then return 0 end
-- The lease's expiry lives in the sender's lease set only.
redis.call('ZADD', lkey(redis.call('HGET', qkey(qid), 's')), expires_at, id)
return 1
"""

_EXPIRE = r"""
-- ARGV: P, now, policy (6), bound. Settles up to `bound` expired leases; returns {settled, more}.
local now, policy, bound, settled = tonumber(ARGV[2]), policy_at(3), tonumber(ARGV[9]), 0
for _, sender in ipairs(redis.call('SMEMBERS', P .. 'senders')) do
  settled = settled + expire_some(sender, now, policy, bound - settled)
  if settled >= bound then flush(); return {settled, 1} end
end
flush()
return {settled, 0}
"""

_SET_FROZEN = r"""
-- ARGV: P, now, mailing, sender ('' for the whole mailing), '1' to freeze or '0' to unfreeze
local now, mailing, sender, frozen = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local function set(qid)
  local q = redis.call('HMGET', qkey(qid), 'fz', 'n', 'r')
  if q[1] == frozen then return 0 end
  redis.call('HSET', qkey(qid), 'fz', frozen, 'ch', now)
  return tonumber(q[2]) + tonumber(q[3])
end
if sender ~= '' then return set(queue_of(mailing, sender, now, true)) end
if frozen == '1' then
  redis.call('SADD', P .. 'frozen', mailing)
else
  redis.call('SREM', P .. 'frozen', mailing)
end
local moved = 0
for _, qid in ipairs(redis.call('HVALS', P .. 'mg:' .. mailing)) do moved = moved + set(qid) end
return moved
"""

_CLEAR = r"""
-- ARGV: P, now, mailing, sender ('' for the whole mailing)
local now, mailing, sender = ARGV[2], ARGV[3], ARGV[4]
local function clear(qid)
  if not qid then return 0 end
  local qk = qkey(qid)
  local q = redis.call('HMGET', qk, 'n', 'r', 'sd', 'ep')
  local moved = tonumber(q[1]) + tonumber(q[2])
  -- A new epoch deletes the queued messages and marks the SENDING ones as cleared since their claim.
  if moved == 0 and q[3] == '0' then return 0 end
  redis.call('HINCRBY', qk, 'x', moved)
  redis.call('HSET', qk, 'n', 0, 'r', 0, 'c' .. q[4], now, 'ep', tonumber(q[4]) + 1)
  if moved > 0 then
    -- O(1): the queued messages stay where they are, renamed aside for purge to find.
    local batch = qid .. ':' .. q[4]
    redis.call('RENAME', zkey(qid), P .. 'zc:' .. batch)
    redis.call('ZADD', P .. 'cleared', now, batch)
  end
  return moved
end
if sender ~= '' then return clear(queue_of(mailing, sender, now, false)) end
local moved = 0
for _, qid in ipairs(redis.call('HVALS', P .. 'mg:' .. mailing)) do moved = moved + clear(qid) end
return moved
"""

_PURGE = r"""
-- ARGV: P, older_than (us), batch. Returns {purged, more}.
local older, left = '(' .. ARGV[2], tonumber(ARGV[3])
local purged = 0
for _, batch in ipairs(redis.call('ZRANGEBYSCORE', P .. 'done', '-inf', older, 'LIMIT', 0, left)) do
  local list = P .. 'dl:' .. batch
  local ids = redis.call('LRANGE', list, 0, left - 1)
  for _, id in ipairs(ids) do
    local r = redis.call('HMGET', mkey(id), 'q', 'st', 'sq')
    if r[1] then
      redis.call('HINCRBY', qkey(r[1]), r[2], -1)
      redis.call('DEL', mkey(id), bkey(r[3]))
      purged = purged + 1
    end
  end
  redis.call('LTRIM', list, #ids, -1)
  left = left - #ids
  if redis.call('EXISTS', list) == 0 then redis.call('ZREM', P .. 'done', batch) end
  if left <= 0 then return {purged, 1} end
end
local batches = redis.call('ZRANGEBYSCORE', P .. 'cleared', '-inf', older, 'LIMIT', 0, left)
for _, batch in ipairs(batches) do
  local zk = P .. 'zc:' .. batch
  local qid = string.match(batch, '^(%d+):')
  local members = redis.call('ZRANGE', zk, 0, left - 1)
  for _, m in ipairs(members) do
    local seq, _, _, id = parse_member(m)
    if redis.call('DEL', mkey(id), bkey(I(seq))) > 0 then
      redis.call('HINCRBY', qkey(qid), 'x', -1)
      purged = purged + 1
    end
    redis.call('ZREM', zk, m)
  end
  left = left - #members
  if redis.call('EXISTS', zk) == 0 then redis.call('ZREM', P .. 'cleared', batch) end
  if left <= 0 then return {purged, 1} end
end
return {purged, 0}
"""

_METRICS = r"""
-- ARGV: P, mailing, sender ('' for all). Returns sender, frozen flag and the six counters per queue.
local mailing, sender = ARGV[2], ARGV[3]
local qids
if sender ~= '' then
  local qid = queue_of(mailing, sender, nil, false)
  qids = qid and {qid} or {}
else
  qids = redis.call('HVALS', P .. 'mg:' .. mailing)
end
local out = {}
for _, qid in ipairs(qids) do
  local q = redis.call('HMGET', qkey(qid), 's', 'fz', 'n', 'r', 'sd', 'd', 'f', 'x')
  for j = 1, 8 do out[#out + 1] = q[j] end
end
return out
"""

_GET = r"""
-- ARGV: P, id. The message with its effective state derived from its claim record, or its queue's
-- flag and epoch.
local id = ARGV[2]
local r = redis.call('HMGET', mkey(id), 'q', 'st', 'a', 'na', 'le', 'ua', 'e', 'sq', 'rc', 'mf', 'ca')
if not r[1] then return false end
local q = redis.call('HMGET', qkey(r[1]), 'm', 's', 'fz', 'ch', 'ep')
local state, frozen_from, attempts, updated = r[2], false, r[3], r[6]
local record = redis.call('HGET', P .. 'c', id)
if record then
  state = 's'
  attempts, updated = string.match(record, '^%d+:%d+:%a:(%d+):(%d+)$')
elseif state == 'n' or state == 'r' then
  if r[7] ~= q[5] then
    state, updated = 'x', redis.call('HGET', qkey(r[1]), 'c' .. r[7])
  else
    if tonumber(q[4]) > tonumber(updated) then updated = q[4] end
    if q[3] == '1' then state, frozen_from = 'z', r[2] end
  end
end
return {q[1], q[2], r[9], r[10], redis.call('GET', bkey(r[8])), state, frozen_from, attempts, r[4], r[5],
        r[11], updated}
"""


@attrs.frozen
class LuaScript:
    """A script's source and its SHA1, known before it is ever loaded."""

    name: str
    source: str
    sha: str


def _script(name: str, *parts: str) -> LuaScript:
    source = "".join(parts)
    return LuaScript(name, source, hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest())


# A namespace's layout: the one it was written in, or LAYOUT, now set, if it is new.
_LAYOUT = r"""
local layout = redis.call('GET', P .. 'layout')
if layout then return layout end
if redis.call('EXISTS', P .. 'seq') == 1 then return '1' end
redis.call('SET', P .. 'layout', ARGV[2])
return ARGV[2]
"""

_SETTLING_PRELUDE = _lifecycle_tables() + _BASE + _SETTLING

SCRIPTS: Final = {
    script.name: script
    for script in (
        _script("layout", _BASE, _LAYOUT),
        _script("enqueue", _BASE, _QUEUE_OF, _ENQUEUE),
        _script("claim", _SETTLING_PRELUDE, _CLAIM),
        _script("settle", _SETTLING_PRELUDE, _SETTLE),
        _script("renew", _BASE, _RENEW),
        _script("expire", _SETTLING_PRELUDE, _EXPIRE),
        _script("set_frozen", _BASE, _QUEUE_OF, _SET_FROZEN),
        _script("clear", _BASE, _QUEUE_OF, _CLEAR),
        _script("purge", _BASE, _PURGE),
        _script("metrics", _BASE, _QUEUE_OF, _METRICS),
        _script("get", _BASE, _GET),
    )
}
"""Every script by name."""
