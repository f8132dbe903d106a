"""Session-wide fixtures."""

from __future__ import annotations

import pytest

pytest_plugins = ["tests.skip_policy"]  # a skip CI does not expect fails the run


@pytest.fixture(scope="session")
def service(tmp_path_factory):
    """The real service (see tests/service_fixture.py), shared by every test_serve*.py module."""
    from tests.service_fixture import running_service

    with running_service(tmp_path_factory.mktemp("service")) as handles:
        yield handles


# -- `longlive serve` (tests/local_serve.py): one start for every test that takes it, stopped after the last
_local_serve: dict = {"server": None, "last_user": None}


@pytest.fixture(scope="session")
def local_serve(tmp_path_factory):
    from tests.local_serve import LocalServe

    directory = tmp_path_factory.mktemp("local-serve")
    server = LocalServe(directory, data_dir=directory / "data")
    _local_serve["server"] = server
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    yield server
    server.stop()


def pytest_collection_modifyitems(items):
    users = [item.nodeid for item in items if "local_serve" in getattr(item, "fixturenames", ())]
    _local_serve["last_user"] = users[-1] if users else None


def pytest_runtest_teardown(item, nextitem):
    # Not at the session's end: its Ray would otherwise run beside the `service` fixture's.
    if item.nodeid == _local_serve["last_user"] and _local_serve["server"] is not None:
        _local_serve["server"].stop()
