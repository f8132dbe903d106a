"""Session checkpoints in Redis: `session:{id}:checkpoint`, a hash of `meta` (JSON) and `block:{n}` (raw
clean latents), written by the owning replica after every block and read by the replica a moved
session lands on.

A write carries only the blocks Redis lacks, and lands only while the writer still owns the session
and the session has not been ended (one Lua script: a replica that lost a session, e.g. after a
network split, cannot overwrite its new owner's checkpoint).
"""

from __future__ import annotations

import json

from longlive_core.checkpoint import SessionCheckpoint, tensor_bytes

from .store import CHECKPOINT, SESSION

# KEYS: session record, checkpoint. ARGV: owner, ttl, meta, n blocks to delete, their fields, then
# field/value pairs to set. Returns 1 when written, 0 when the caller does not own a live session.
_SAVE = """
if redis.call('HGET', KEYS[1], 'replica') ~= ARGV[1] or redis.call('HEXISTS', KEYS[1], 'ended') == 1 then
  return 0
end
local stale = tonumber(ARGV[4])
for i = 5, 4 + stale do redis.call('HDEL', KEYS[2], ARGV[i]) end
redis.call('HSET', KEYS[2], 'meta', ARGV[3])
for i = 5 + stale, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[2]))
return 1
"""


class CheckpointStore:
    """Sync access for a replica's Redis thread (binary values: a client of its own)."""

    def __init__(self, redis_url: str, ttl_s: int, timeout_s: float = 2.0):
        from jobs.redis_client import sync_client

        # A save writes the same blocks and meta when sent again: safe to re-send.
        self.redis = sync_client(redis_url, timeout_s, decode=False)
        self.ttl_s = ttl_s
        self._save = self.redis.register_script(_SAVE)
        self.stored: dict[str, set[int]] = {}  # session -> blocks known to be in Redis

    def save(self, checkpoint: SessionCheckpoint, owner: str) -> bool:
        """Write the checkpoint's new blocks and meta; False when `owner` no longer owns the session."""
        sid = checkpoint.session_id
        stored = self.stored.get(sid, set())
        keep = set(checkpoint.latents)
        stale = sorted(stored - keep)
        new = sorted(keep - stored)
        args: list = [owner, self.ttl_s, checkpoint.meta_json(), len(stale), *(f"block:{b}" for b in stale)]
        for block in new:
            args += [f"block:{block}", tensor_bytes(checkpoint.latents[block])]
        written = self._save(keys=[SESSION.format(sid), CHECKPOINT.format(sid)], args=args)
        if written:
            self.stored[sid] = keep
        return bool(written)

    def load(self, session_id: str) -> SessionCheckpoint | None:
        fields = self.redis.hgetall(CHECKPOINT.format(session_id))
        if b"meta" not in fields:
            return None
        blobs = {int(k[len(b"block:") :]): v for k, v in fields.items() if k.startswith(b"block:")}
        checkpoint = SessionCheckpoint.from_parts(json.loads(fields[b"meta"]), blobs)
        self.stored[session_id] = set(checkpoint.latents)
        return checkpoint

    def forget(self, session_id: str) -> None:
        """Stop tracking a session this replica no longer writes (its checkpoint stays)."""
        self.stored.pop(session_id, None)
