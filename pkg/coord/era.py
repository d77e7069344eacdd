"""Failover epochs: tokens issued by a promoted primary stay above everything issued before.

Redis replication is asynchronous: a replica promoted by Sentinel can lack the last
acknowledged ``INCR`` of a fence counter, and would hand the same token out again. Every
counter that issues tokens (ownership fences, lease epochs, ``FenceCounter``) therefore issues
them above a floor ``epoch * EPOCH_SPAN``, where ``epoch`` is the failover epoch of the primary
running the script: the Sentinels' ``config-epoch`` of that primary, which the Sentinel quorum
agreed on and which is higher for every promotion. ``pkg.common.redisconn`` registers it on the
primary (``ERA_KEY`` = ``<master_replid>|<epoch>``) from each new connection, in the same step
as it learnt the primary's address. Tokens of epoch ``e`` lie in ``[e * SPAN, (e + 1) * SPAN)``
so a token of a later primary is above every token of an earlier one, whatever the counter
lost.

The script checks that the record belongs to the primary it runs on (``master_replid`` is new
after a promotion): a record written by an earlier primary (replicated before it died) is not
this primary's epoch, so the script refuses (``ERA``), and the connection reconnects through
the Sentinels, registering the right epoch first. Without a record (a plain Redis URL, no
Sentinel) the floor is 0 and tokens are exactly what the counter says, as before.
"""

from __future__ import annotations

from pkg.common.redisconn import ERA_KEY

# Counter values per failover epoch: 2**36 (~6.9e10) tokens per epoch, 2**17 epochs before
# Lua's doubles (exact to 2**53) could no longer hold a token.
EPOCH_SPAN = 2**36

# ``era_floor(key)``: the lowest token this primary may issue (0 without a record).
ERA_LUA = f"""
local function era_floor(era_key)
  local rec = redis.call('GET', era_key)
  if not rec then return 0 end
  local rid, ep = string.match(rec, '^(%x+)|(%d+)$')
  if not rid then return 0 end
  local info = redis.call('INFO', 'replication')
  if string.match(info, 'master_replid:(%x+)') ~= rid then
    error({{err = 'ERA failover epoch recorded by another primary; reconnect'}})
  end
  return tonumber(ep) * {EPOCH_SPAN}
end
"""

__all__ = ["EPOCH_SPAN", "ERA_KEY", "ERA_LUA", "epoch_of", "token_epoch"]


def token_epoch(token: int) -> int:
    """The failover epoch a token was issued in."""
    return token // EPOCH_SPAN


def epoch_of(token: int) -> tuple[int, int]:
    """``(failover epoch, counter within it)`` of a token (for logs and drills)."""
    return divmod(token, EPOCH_SPAN)
