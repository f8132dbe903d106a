"""Session-wide fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def service(tmp_path_factory):
    """The real service (see tests/service_fixture.py), shared by every test_serve*.py module."""
    from tests.service_fixture import running_service

    with running_service(tmp_path_factory.mktemp("service")) as handles:
        yield handles
