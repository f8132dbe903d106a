"""Ray's experimental and alpha APIs this repo builds on, checked where they are used, without starting
Ray: pyproject.toml pins Ray to the minor these checks pass on, and a Ray that changes one fails here
first, naming it (not deep inside a serving or training test)."""

from __future__ import annotations

import inspect
import types


def _names(code: types.CodeType) -> set[str]:
    """Every global and attribute name a function's code (and its nested code) reads."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


def test_the_routing_loop_borrowed_from_consistent_hash_router_fits_session_router():
    """deployments/router.py: SessionRouter takes ConsistentHashRouter._fulfill_pending_requests
    (ray.serve.experimental) as its own routing loop, in place of RequestRouter's."""
    from ray.serve.experimental.consistent_hash_router import ConsistentHashRouter
    from ray.serve.request_router import RequestRouter

    from deployments.router import SessionRouter

    loop = ConsistentHashRouter._fulfill_pending_requests
    assert issubclass(ConsistentHashRouter, RequestRouter) and issubclass(SessionRouter, RequestRouter)
    assert SessionRouter._fulfill_pending_requests is loop
    # It overrides the base loop, which Ray calls as a coroutine with no arguments.
    assert inspect.iscoroutinefunction(loop) and inspect.iscoroutinefunction(
        RequestRouter._fulfill_pending_requests
    )
    assert (
        list(inspect.signature(loop).parameters)
        == list(inspect.signature(RequestRouter._fulfill_pending_requests).parameters)
        == ["self"]
    )
    # It may use RequestRouter's state only: a name only ConsistentHashRouter defines is missing on ours.
    only_theirs = _names(loop.__code__) & (set(vars(ConsistentHashRouter)) - set(dir(RequestRouter)))
    assert not only_theirs, f"the borrowed loop now needs ConsistentHashRouter's {sorted(only_theirs)}"
    # What SessionRouter overrides and reads (choose_replicas, a request's metadata and routing context).
    params = inspect.signature(RequestRouter.choose_replicas).parameters
    assert list(params) == ["self", "candidate_replicas", "pending_request"]
    assert list(inspect.signature(SessionRouter.choose_replicas).parameters) == list(params)
    from ray.serve._private.request_router.common import PendingRequest

    fields = PendingRequest.__dataclass_fields__
    assert {"metadata", "routing_context"} <= fields.keys()


def test_get_all_reported_checkpoints_takes_a_committed_consistency_mode():
    """jobs/train.py: the crash test waits on ray.train.get_all_reported_checkpoints (alpha in Ray 2.60)
    with consistency_mode=CheckpointConsistencyMode.COMMITTED."""
    from ray.train import CheckpointConsistencyMode, get_all_reported_checkpoints

    from jobs import train

    signature = inspect.signature(get_all_reported_checkpoints)
    mode = signature.parameters.get("consistency_mode")
    assert mode is not None and mode.kind is not mode.POSITIONAL_ONLY, f"now {signature}"
    assert (
        isinstance(mode.default, CheckpointConsistencyMode)
        and "COMMITTED" in CheckpointConsistencyMode.__members__
    )
    assert "get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)" in (
        inspect.getsource(train._crash)
    ), "jobs/train.py calls it differently now: update this check with it"
