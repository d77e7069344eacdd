"""Compare-and-set Lua scripts shared by the coordination primitives.

Leases, ownership records and replica claims all hold a value that only its holder may extend
or drop: each check-then-act runs as one script, so no other client can slip in between the
check and the act.
"""

from __future__ import annotations

# KEYS[1]: the key; ARGV[1]: the value the caller holds. Returns 1 when deleted, else 0.
DELETE_IF_EQUALS = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""

# KEYS[1]: the key; ARGV[1]: the value the caller holds; ARGV[2]: the new TTL in ms.
# Returns 1 when extended, else 0.
EXPIRE_IF_EQUALS = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
