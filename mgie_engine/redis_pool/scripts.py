"""Lua scripts: each runs atomically in Redis, so an ownership check and the write it guards cannot be split.

``XACK`` does not check who owns an entry, and a min-idle-0 ``XCLAIM`` would take back an entry that the
reclaimer already gave to another worker; so every renew, commit and dead-letter first asks ``XPENDING``
whether the caller (still) owns the entry, in the same script.
"""

from __future__ import annotations

# KEYS: jobs stream, ref key, result key, input key. ARGV: job json, image, ttl.
# Idempotent: a job that already has a result or a live stream entry is not added again.
SUBMIT = """
if redis.call('EXISTS', KEYS[3]) == 1 then return 'done' end
local ref = redis.call('GET', KEYS[2])
if ref then
  if #redis.call('XRANGE', KEYS[1], ref, ref) > 0 then return 'queued' end
end
redis.call('SET', KEYS[4], ARGV[2], 'EX', ARGV[3])
local id = redis.call('XADD', KEYS[1], '*', 'job', ARGV[1])
redis.call('SET', KEYS[2], id, 'EX', ARGV[3])
return id
"""

# KEYS: jobs stream, then one cancel key per entry. ARGV: group, consumer, then the entry ids.
# For each entry: {owned, cancelled}. Owned entries get their idle time reset by XCLAIM ... JUSTID, which
# does not count as a delivery; an entry the caller no longer owns is left alone.
RENEW = """
local out = {}
for i = 3, #ARGV do
  local id = ARGV[i]
  local owned = 0
  if #redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1, ARGV[2]) > 0 then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'JUSTID')
    owned = 1
  end
  out[#out + 1] = owned
  out[#out + 1] = redis.call('EXISTS', KEYS[i - 1])
end
return out
"""

# KEYS: jobs stream, result key, result png key, results stream, input key, ref key.
# ARGV: group, consumer, entry id, job id, status, meta json, png ('' for none), ttl, results maxlen.
# Only the owner commits, and only once: result + results entry + XACK together, or nothing.
COMMIT = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1, ARGV[2]) == 0 then return 0 end
if redis.call('EXISTS', KEYS[2]) == 0 then
  if ARGV[7] ~= '' then redis.call('SET', KEYS[3], ARGV[7], 'EX', ARGV[8]) end
  redis.call('SET', KEYS[2], ARGV[6], 'EX', ARGV[8])
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[9], '*', 'job', ARGV[4], 'status', ARGV[5])
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
redis.call('DEL', KEYS[5], KEYS[6])
return 1
"""

# KEYS: jobs stream, result key, results stream, input key, ref key, dead-letter stream.
# ARGV: group, entry id, consumer ('' = any consumer, if idle at least min-idle), min idle ms, max deliveries,
#       job id, meta json, ttl, results maxlen.
# Reads the delivery count from XPENDING; moves the entry to the dead-letter stream only at the limit.
DEAD_LETTER = """
local p
if ARGV[3] ~= '' then
  p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1, ARGV[3])
else
  p = redis.call('XPENDING', KEYS[1], ARGV[1], 'IDLE', ARGV[4], ARGV[2], ARGV[2], 1)
end
if #p == 0 or tonumber(p[1][4]) < tonumber(ARGV[5]) then return 0 end
local body = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
local job = ''
if #body > 0 then job = body[1][2][2] end
redis.call('XADD', KEYS[6], 'MAXLEN', '~', 1000, '*', 'id', ARGV[6], 'deliveries', p[1][4],
           'consumer', p[1][2], 'job', job)
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('SET', KEYS[2], ARGV[7], 'EX', ARGV[8])
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[9], '*', 'job', ARGV[6], 'status', 'dead')
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('DEL', KEYS[4], KEYS[5])
return 1
"""
