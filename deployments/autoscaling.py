"""Generator autoscaling on what fills a replica: live sessions and batch jobs, not ongoing requests.

A Ray Serve custom autoscaling policy (2.60: `autoscaling_config.policy.policy_function`, a class is
built once with `policy_kwargs`). Each replica reports `record_autoscaling_stats()` (deployments/
generator.py): `slots_used` (live sessions + running jobs), `sessions` (live sessions only), `capacity`
(max_sessions) and `jobs_queued` (the queue's depth, the same on every replica). Serve aggregates each
over `look_back_period_s` with the deployment's `aggregation_function` (`max` in the shipped config: a
replica that held a session at any moment of the window counts as busy), then:

- demand = slots used + queued jobs + `headroom_slots` (free slots kept so a new session never waits
  for a replica to start: minutes of weights and warm-up on a GPU);
- desired = ceil(demand / capacity);
- scaling down removes at most as many replicas as are idle (no session, no job; a replica that has
  not reported yet is not idle). Serve chooses which replica stops (pending ones first, then by node),
  not us: with one Generator per GPU node that is usually an idle one, and when it is not, its sessions
  move to another replica from their checkpoints (a ~1.2 s pause) while it drains for
  `graceful_shutdown_timeout_s`.

Serve applies min/max_replicas, upscale/downscale delays and factors after this (its wrapper around
every custom policy). Importable without Ray; pickled by value into the Serve controller.
"""

from __future__ import annotations

import math


def desired_replicas(
    current: int,
    slots_used: dict[str, float],
    sessions: dict[str, float],
    capacity: dict[str, float],
    jobs_queued: float,
    default_capacity: int,
    headroom_slots: int,
) -> int:
    """Replicas for this load. Per replica id (of those that reported): slots used (sessions + jobs),
    live sessions, capacity. Scaling down stops at the replicas that are not idle: those with a session
    or a job, and those that have not reported (current - len(slots_used))."""
    used = sum(slots_used.values())
    slots = [capacity.get(rid, default_capacity) or default_capacity for rid in slots_used]
    per_replica = min(slots, default=default_capacity)  # a mixed fleet: plan with the smallest
    demand = used + max(0.0, jobs_queued) + headroom_slots
    desired = math.ceil(demand / per_replica)
    if desired < current:
        idle = sum(1 for rid, n in slots_used.items() if n <= 0 and sessions.get(rid, 0) <= 0)
        desired = max(desired, current - idle)
    return max(desired, 0)


class SessionAutoscaler:
    """policy_function for the Generator: `deployments.autoscaling:SessionAutoscaler`."""

    def __init__(self, capacity: int = 1, headroom_slots: int = 1):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if headroom_slots < 0:
            raise ValueError(f"headroom_slots must be >= 0, got {headroom_slots}")
        self.capacity = capacity
        self.headroom_slots = headroom_slots

    def __call__(self, ctx) -> tuple[int, dict]:
        metrics = ctx.aggregated_metrics or {}
        running = {str(rid): rid for rid in ctx.running_replicas}

        def per_replica(name: str) -> dict[str, float]:
            values = metrics.get(name, {})
            return {str(rid): float(v) for rid, v in values.items() if str(rid) in running}

        slots_used = per_replica("slots_used")
        queued = max(per_replica("jobs_queued").values(), default=0.0)
        desired = desired_replicas(
            current=ctx.current_num_replicas,
            slots_used=slots_used,
            sessions=per_replica("sessions"),
            capacity=per_replica("capacity"),
            jobs_queued=queued,
            default_capacity=self.capacity,
            headroom_slots=self.headroom_slots,
        )
        return desired, {"demand_slots": sum(slots_used.values()) + queued}
