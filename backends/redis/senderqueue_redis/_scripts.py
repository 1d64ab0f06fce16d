"""The Lua scripts: every change that touches several keys is one of them.

Each script receives ``KEYS[1]`` (a key of the namespace, so that Redis Cluster
routes it to the namespace's slot) and ``ARGV[1]``, the namespace's key prefix;
every key it builds starts with that prefix, so it lives in the same slot.

Key layout under the prefix ``P`` (``sq:{<namespace>}:``), ids being raw suffixes
after a type tag that contains no ``:`` (so no id can spell another key):

=====================  ======  =========================================================
key                    type    holds
=====================  ======  =========================================================
``P seq / tok / qn``   string  counters: enqueue order, claim tokens, sender queue numbers
``P mg:<mailing>``     hash    sender -> sender queue number
``P frozen``           set     mailings frozen as a whole (later sender queues start frozen)
``P q:<n>``            hash    a sender queue: mailing, sender, frozen flag, clear epoch,
                               the counters, and the time each epoch was cleared
``P z:<n>``            zset    its NEW and RETRIES messages of this epoch, scored by next
                               attempt time, member = 16-digit enqueue seq + message id
``P zc:<n>:<epoch>``   zset    what a clear left behind (for purge), renamed from ``z:``
``P cleared``          zset    ``<n>:<epoch>`` by clear time
``P sq:<sender>``      set     the sender's queue numbers
``P l:<sender>``       zset    the sender's valid leases: message id by expiry time
``P senders``          set     senders with queues (``expire_leases`` walks them)
``P m:<id>``           hash    a message, without its content
``P b:<id>``           string  its content
``P done``             zset    terminal message ids by the time they became terminal
=====================  ======  =========================================================
"""

from __future__ import annotations

import hashlib
from typing import Final

import attrs

from senderqueue import LIFECYCLE, State, Trigger

__all__ = ["CODES", "SCRIPTS", "STATES", "LuaScript"]

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


_PRELUDE = r"""
local P = ARGV[1]
local function I(x) return string.format('%d', x) end
local function qkey(qid) return P .. 'q:' .. qid end
local function zkey(qid) return P .. 'z:' .. qid end
local function mkey(id) return P .. 'm:' .. id end
local function bkey(id) return P .. 'b:' .. id end
local function lkey(sender) return P .. 'l:' .. sender end
local function member(seq, id) return string.format('%016d', seq) .. id end

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

-- Writes that many messages share, gathered during a script and made once at its end by flush():
-- counter deltas per sender queue, lease removals per sender, new terminal messages.
local deltas, unleased, finished = {}, {}, {}
local function count(qid, field, n)
  local d = deltas[qid]
  if not d then d = {}; deltas[qid] = d end
  d[field] = (d[field] or 0) + n
end
local function in_chunks(command, key, items)
  for i = 1, #items, 1000 do
    redis.call(command, key, unpack(items, i, math.min(i + 999, #items)))
  end
end
local function flush()
  for qid, d in pairs(deltas) do
    for field, n in pairs(d) do
      if n ~= 0 then redis.call('HINCRBY', qkey(qid), field, n) end
    end
  end
  for sender, ids in pairs(unleased) do in_chunks('ZREM', lkey(sender), ids) end
  if #finished > 0 then in_chunks('ZADD', P .. 'done', finished) end
  deltas, unleased, finished = {}, {}, {}
end

-- What a settling script needs of a sender queue; its flag and epoch do not change during it.
local queue_cache = {}
local now_text = {}  -- now, formatted once per script
local function queue_state(qid)
  local q = queue_cache[qid]
  if not q then
    q = redis.call('HMGET', qkey(qid), 'ep', 'fz', 's')
    queue_cache[qid] = q
  end
  return q
end

-- The fields leave() needs, read in one call; holds() checks the first two.
local LEAVING = {'st', 't', 'q', 'cf', 'a', 'ca', 'e', 'sq', 'na'}

-- A SENDING message leaves by `trigger`, with the precedence of _lifecycle.leave_sending.
-- `r` is HMGET of LEAVING.
local function leave(id, r, trigger, err, now, policy)
  local qid, claimed_from, attempts, created = r[3], r[4], tonumber(r[5]), tonumber(r[6])
  local q = queue_state(qid)
  local cleared = r[7] ~= q[1]
  local next_at = false
  if (trigger == 'soft_bounce' or trigger == 'expire') and not cleared
      and not exhausted(policy, attempts, created, now) then
    next_at = now + backoff(policy, attempts, id)
  end
  local dest, frozen_from = nil, false
  if trigger == 'deliver' then
    dest = 'd'
  elseif trigger == 'hard_bounce' then
    dest = 'f'
  elseif cleared then
    dest = 'x'
  else
    local retried = trigger == 'soft_bounce' or trigger == 'expire'
    local back = retried and 'r' or claimed_from
    if retried and not next_at then
      dest = 'f'
    elseif q[2] == '1' then
      dest, frozen_from = 'z', back
    else
      dest = back
    end
  end
  if not LEAVE[trigger][dest] then
    error('senderqueue: ' .. trigger .. ' cannot move SENDING to ' .. dest)
  end
  local gone = unleased[q[3]]
  if not gone then gone = {}; unleased[q[3]] = gone end
  gone[#gone + 1] = id
  -- The stale token and expiry stay in the hash: nothing trusts them unless the state is SENDING.
  local stamp = now_text[now]
  if not stamp then stamp = I(now); now_text[now] = stamp end
  local fields = {'ua', stamp}
  if err then fields[#fields + 1] = 'le'; fields[#fields + 1] = err end
  if trigger == 'release' then
    fields[#fields + 1] = 'a'; fields[#fields + 1] = I(attempts - 1)
  end
  count(qid, 'sd', -1)
  local back = frozen_from or dest
  if back == 'n' or back == 'r' then
    local due = r[9]
    if next_at then
      due = I(next_at)
      fields[#fields + 1] = 'na'; fields[#fields + 1] = due
    end
    fields[#fields + 1] = 'st'; fields[#fields + 1] = back
    count(qid, back, 1)
    redis.call('ZADD', zkey(qid), due, member(tonumber(r[8]), id))
  else
    fields[#fields + 1] = 'st'; fields[#fields + 1] = dest
    count(qid, dest, 1)
    finished[#finished + 1] = now
    finished[#finished + 1] = id
  end
  redis.call('HSET', mkey(id), unpack(fields))
end

local function expire_sender(sender, now, policy)
  local ids = redis.call('ZRANGEBYSCORE', lkey(sender), '-inf', now)
  for _, id in ipairs(ids) do
    leave(id, redis.call('HMGET', mkey(id), unpack(LEAVING)), 'expire', 'lease expired', now, policy)
  end
  return #ids
end

local function holds(id, token)
  local r = redis.call('HMGET', mkey(id), 'st', 't')
  return r[1] == 's' and r[2] == token
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
  redis.call('HSET', mkey(id), 'q', q[1], 'rc', ARGV[base + 3], 'mf', ARGV[base + 4], 'st', 'n',
             'a', 0, 'na', now, 'sq', I(seq), 'e', q[2], 'ca', now, 'ua', now)
  redis.call('SET', bkey(id), ARGV[base + 5])
  redis.call('ZADD', zkey(q[1]), now, member(seq, id))
  added[q[1]] = added[q[1]] + 1
end
for qid, n in pairs(added) do redis.call('HINCRBY', qkey(qid), 'n', n) end
return {'ok'}
"""

_CLAIM = r"""
-- ARGV: P, now, sender, limit, expires_at, policy (6)
local now, sender, limit, expires_at = tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4]), ARGV[5]
expire_sender(sender, now, policy_at(6))
local candidates = {}
local qids = redis.call('SMEMBERS', P .. 'sq:' .. sender)
for _, qid in ipairs(qids) do
  if redis.call('HGET', qkey(qid), 'fz') == '0' then
    local due = redis.call('ZRANGEBYSCORE', zkey(qid), '-inf', now, 'WITHSCORES', 'LIMIT', 0, limit)
    for j = 1, #due, 2 do
      candidates[#candidates + 1] = {tonumber(due[j + 1]), due[j], qid}
    end
  end
end
if #qids > 1 then
  -- Merge the queues' heads: next attempt time, then enqueue order (the member's fixed-width prefix).
  table.sort(candidates, function(a, b) return a[1] < b[1] or (a[1] == b[1] and a[2] < b[2]) end)
end
local taken = math.min(limit, #candidates)
if taken == 0 then flush(); return {} end
local token = redis.call('INCRBY', P .. 'tok', taken) - taken
local out, names, heads, leases = {}, {}, {}, {}
for i = 1, taken do
  local c = candidates[i]
  local qid, id = c[3], string.sub(c[2], 17)
  -- What a queue gives is always its first members, so they are removed by rank below.
  heads[qid] = (heads[qid] or 0) + 1
  local mk = mkey(id)
  local r = redis.call('HMGET', mk, 'st', 'a', 'rc', 'mf', 'na', 'le', 'ca')
  if not CLAIMABLE[r[1]] then return redis.error_reply('senderqueue: cannot claim a message in ' .. r[1]) end
  local attempts = tonumber(r[2]) + 1
  token = token + 1
  local token_text = I(token)
  redis.call('HSET', mk, 'st', 's', 'cf', r[1], 'a', attempts, 't', token_text, 'x', expires_at,
             'ua', ARGV[2])
  leases[#leases + 1] = expires_at
  leases[#leases + 1] = id
  count(qid, r[1], -1)
  count(qid, 'sd', 1)
  local name = names[qid]
  if not name then name = redis.call('HGET', qkey(qid), 'm'); names[qid] = name end
  out[#out + 1] = id
  out[#out + 1] = name
  out[#out + 1] = r[3]
  out[#out + 1] = r[4]
  out[#out + 1] = redis.call('GET', bkey(id))
  out[#out + 1] = attempts
  out[#out + 1] = r[5]
  out[#out + 1] = r[6]
  out[#out + 1] = r[7]
  out[#out + 1] = token_text
end
for qid, k in pairs(heads) do redis.call('ZREMRANGEBYRANK', zkey(qid), 0, k - 1) end
in_chunks('ZADD', lkey(sender), leases)
flush()
return out
"""

_SETTLE = r"""
-- ARGV: P, now, policy (6), then per claim: id, token, trigger, error ('' for none, else '=' .. error)
local now = tonumber(ARGV[2])
local policy = policy_at(3)
local out = {}
for i = 9, #ARGV, 4 do
  local id, token, trigger, err = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local r = redis.call('HMGET', mkey(id), unpack(LEAVING))
  if r[1] == 's' and r[2] == token then
    leave(id, r, trigger, err ~= '' and string.sub(err, 2) or false, now, policy)
    out[#out + 1] = 0
  else
    out[#out + 1] = 1
  end
end
flush()
return out
"""

_RENEW = r"""
-- ARGV: P, id, token, expires_at
local id, token, expires_at = ARGV[2], ARGV[3], ARGV[4]
if not holds(id, token) then return 0 end
local mk = mkey(id)
redis.call('HSET', mk, 'x', expires_at)
local sender = redis.call('HGET', qkey(redis.call('HGET', mk, 'q')), 's')
redis.call('ZADD', lkey(sender), expires_at, id)
return 1
"""

_EXPIRE = r"""
-- ARGV: P, now, policy (6)
local now, policy, settled = tonumber(ARGV[2]), policy_at(3), 0
for _, sender in ipairs(redis.call('SMEMBERS', P .. 'senders')) do
  settled = settled + expire_sender(sender, now, policy)
end
flush()
return settled
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
local ids = redis.call('ZRANGEBYSCORE', P .. 'done', '-inf', older, 'LIMIT', 0, left)
for _, id in ipairs(ids) do
  local r = redis.call('HMGET', mkey(id), 'q', 'st')
  if r[1] then
    redis.call('HINCRBY', qkey(r[1]), r[2], -1)
    redis.call('DEL', mkey(id), bkey(id))
    purged = purged + 1
  end
  redis.call('ZREM', P .. 'done', id)
end
left = left - #ids
if left <= 0 then return {purged, 1} end
local batches = redis.call('ZRANGEBYSCORE', P .. 'cleared', '-inf', older, 'LIMIT', 0, left)
for _, batch in ipairs(batches) do
  local zk = P .. 'zc:' .. batch
  local qid = string.match(batch, '^(%d+):')
  local members = redis.call('ZRANGE', zk, 0, left - 1)
  for _, m in ipairs(members) do
    local id = string.sub(m, 17)
    if redis.call('DEL', mkey(id), bkey(id)) > 0 then
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
-- ARGV: P, id. The message with its effective state derived from its queue's flag and epoch.
local id = ARGV[2]
local r = redis.call('HMGET', mkey(id), 'q', 'rc', 'mf', 'st', 'a', 'na', 'le', 'ca', 'ua', 'e')
if not r[1] then return false end
local q = redis.call('HMGET', qkey(r[1]), 'm', 's', 'fz', 'ch', 'ep')
local state, frozen_from, updated = r[4], false, r[9]
if state == 'n' or state == 'r' then
  if r[10] ~= q[5] then
    state, updated = 'x', redis.call('HGET', qkey(r[1]), 'c' .. r[10])
  else
    if tonumber(q[4]) > tonumber(updated) then updated = q[4] end
    if q[3] == '1' then state, frozen_from = 'z', r[4] end
  end
end
return {q[1], q[2], r[2], r[3], redis.call('GET', bkey(id)), state, frozen_from, r[5], r[6], r[7],
        r[8], updated}
"""


@attrs.frozen
class LuaScript:
    """A script's source and its SHA1, known before it is ever loaded."""

    name: str
    source: str
    sha: str


def _script(name: str, body: str) -> LuaScript:
    source = _lifecycle_tables() + _PRELUDE + body
    return LuaScript(name, source, hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest())


SCRIPTS: Final = {
    name: _script(name, body)
    for name, body in {
        "enqueue": _ENQUEUE,
        "claim": _CLAIM,
        "settle": _SETTLE,
        "renew": _RENEW,
        "expire": _EXPIRE,
        "set_frozen": _SET_FROZEN,
        "clear": _CLEAR,
        "purge": _PURGE,
        "metrics": _METRICS,
        "get": _GET,
    }.items()
}
"""Every script by name."""
