"""The Generator's autoscaling policy (deployments/autoscaling.py): on its own, and wrapped the way the
Serve controller runs it (min/max bounds, delays), with Ray's own AutoscalingContext. No Ray cluster."""

from __future__ import annotations

import pytest
import yaml
from ray.serve._private.autoscaling_state import _resolve_policy_callable
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.autoscaling_policy import _apply_autoscaling_config
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from deployments.autoscaling import SessionAutoscaler, desired_replicas
from tests.test_k8s import K8S

DEPLOYMENT = DeploymentID(name="Generator", app_name="longlive")


def shipped_config(**changes) -> AutoscalingConfig:
    """The Generator's autoscaling_config from k8s/rayservice.yaml (delays off unless given)."""
    (service,) = yaml.safe_load_all((K8S / "rayservice.yaml").read_text())
    app = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]
    (generator,) = [d for d in app["deployments"] if d["name"] == "Generator"]
    return AutoscalingConfig(
        **{**generator["autoscaling_config"], "upscale_delay_s": 0, "downscale_delay_s": 0, **changes}
    )


def context(config: AutoscalingConfig, replicas: dict[str, dict], queued: int = 0) -> AutoscalingContext:
    """replicas: id -> {"sessions": n, "jobs": n, "capacity": n}, or {} for one not reported yet."""
    ids = {name: ReplicaID(unique_id=name, deployment_id=DEPLOYMENT) for name in replicas}
    reported = {name: r for name, r in replicas.items() if r}
    metrics = {
        "slots_used": {ids[n]: r["sessions"] + r.get("jobs", 0) for n, r in reported.items()},
        "sessions": {ids[n]: r["sessions"] for n, r in reported.items()},
        "capacity": {ids[n]: r["capacity"] for n, r in reported.items()},
        "jobs_queued": {ids[n]: queued for n in reported},
    }
    return AutoscalingContext(
        deployment_id=DEPLOYMENT,
        deployment_name="Generator",
        app_name="longlive",
        current_num_replicas=len(replicas),
        target_num_replicas=len(replicas),
        running_replicas=list(ids.values()),
        total_num_requests=sum(r.get("sessions", 0) for r in reported.values()),
        total_queued_requests=0,
        aggregated_metrics=metrics,
        raw_metrics={},
        capacity_adjusted_min_replicas=config.min_replicas,
        capacity_adjusted_max_replicas=config.max_replicas,
        policy_state={},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=1000.0,
        config=config,
    )


def decide(config: AutoscalingConfig, replicas: dict[str, dict], queued: int = 0) -> int:
    """What the controller would do: the shipped policy, built from its import path and kwargs, in
    Serve's wrapper (delays, scaling factors), then clamped to min/max_replicas (apply_bounds)."""
    policy = _apply_autoscaling_config(_resolve_policy_callable(config.policy))
    replicas_wanted, _ = policy(context(config, replicas, queued))
    return max(config.min_replicas, min(config.max_replicas, replicas_wanted))


def full(capacity=1):
    return {"sessions": capacity, "capacity": capacity}


def idle(capacity=1):
    return {"sessions": 0, "capacity": capacity}


def test_the_shipped_config_builds_the_session_policy():
    config = shipped_config()
    policy = _resolve_policy_callable(config.policy)
    assert isinstance(policy, SessionAutoscaler)
    assert (policy.capacity, policy.headroom_slots) == (1, 1)
    assert config.aggregation_function == "max"


def test_more_sessions_than_capacity_add_a_replica():
    config = shipped_config()
    # 2 replicas of 1 slot, both busy: one more, so the next session has a warm slot (headroom 1).
    assert decide(config, {"a": full(), "b": full()}) == 3
    # Replicas of 4 slots: 7 of 8 used + 1 headroom fits; 8 of 8 needs a third.
    assert decide(config, {"a": full(4), "b": {"sessions": 3, "capacity": 4}}) == 2
    assert decide(config, {"a": full(4), "b": full(4)}) == 3


def test_queued_jobs_add_replicas_too():
    config = shipped_config()
    assert decide(config, {"a": idle()}, queued=0) == 1  # the headroom slot
    assert decide(config, {"a": {"sessions": 0, "jobs": 1, "capacity": 1}}, queued=2) == 4
    assert decide(config, {"a": idle()}, queued=100) == config.max_replicas  # bounded by Serve


def test_idle_replicas_go_busy_ones_stay():
    config = shipped_config()
    # 4 replicas, 1 session: demand 2 slots. Two idle ones may go; the busy two stay.
    busy = {"a": full(), "b": idle(), "c": idle(), "d": idle()}
    assert decide(config, busy) == 2
    # Sessions everywhere but demand for fewer (capacity 4, one session each): no replica is removed.
    assert decide(config, {n: {"sessions": 1, "capacity": 4} for n in "abcd"}) == 4
    # A replica running only a job is busy as well.
    job = {"a": idle(4), "b": {"sessions": 0, "jobs": 1, "capacity": 4}, "c": {"sessions": 1, "capacity": 4}}
    assert decide(config, job) == 2
    # A replica that has not reported yet is never counted idle.
    assert decide(config, {"a": idle(4), "b": {}, "c": {}}) == 2


def test_never_below_min_replicas():
    config = shipped_config(min_replicas=2)
    assert decide(config, {"a": idle(), "b": idle(), "c": idle()}) == 2


def test_downscale_waits_for_the_delay():
    config = shipped_config(downscale_delay_s=600)
    assert decide(config, {"a": full(), "b": idle(), "c": idle()}) == 3  # first tick: not yet


@pytest.mark.parametrize(
    "kwargs", [{"capacity": 0}, {"headroom_slots": -1}], ids=["no capacity", "negative headroom"]
)
def test_policy_rejects_bad_kwargs(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SessionAutoscaler(**kwargs)


def test_desired_replicas_plans_with_the_smallest_replica():
    used = {"a": 2.0, "b": 1.0}
    n = desired_replicas(2, used, used, {"a": 4, "b": 2}, 0, default_capacity=1, headroom_slots=1)
    assert n == 2  # 4 slots wanted / 2 per replica
