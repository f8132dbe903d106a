"""A pytest plugin (tests/conftest.py loads it): a skip CI does not expect fails the run.

Every skip must state its reason and match an entry of EXPECTED_SKIPS; any other skip is listed at the
end of the run and turns its exit status into a failure, so a test that silently stops running (a
missing binary, an import that broke) is seen, not counted as green.
"""

from __future__ import annotations

import pytest

# Test id prefix -> a fragment of the reason it skips with.
EXPECTED_SKIPS: dict[str, str] = {
    # torchao's fp8 refuses to quantize without FP8 tensor cores; CI has no GPU. The CPU covers fp8 through
    # the emulation and the start-up refusal (tests/test_quantization.py).
    "tests/test_quantization.py::test_torchao_fp8_linear_on_an_fp8_device": "needs FP8 tensor cores",
}
_NO_REASON = {"", "unconditional skip"}
_unexpected: list[str] = []


def skip_reason(report: pytest.CollectReport | pytest.TestReport) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped").removeprefix(":").strip()  # pytest.skip() with no reason: "Skipped"


def is_expected(nodeid: str, reason: str, expected: dict[str, str] = EXPECTED_SKIPS) -> bool:
    if reason in _NO_REASON:
        return False
    return any(nodeid.startswith(prefix) and fragment in reason for prefix, fragment in expected.items())


def _check(report: pytest.CollectReport | pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = skip_reason(report)
        if not is_expected(report.nodeid, reason):
            _unexpected.append(f"{report.nodeid}: {'(no reason given)' if reason in _NO_REASON else reason}")


def pytest_collectreport(report: pytest.CollectReport) -> None:
    _check(report)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _check(report)


def pytest_terminal_summary(terminalreporter) -> None:
    if _unexpected:
        terminalreporter.section("unexpected skips (tests/skip_policy.py)", red=True)
        for line in _unexpected:
            terminalreporter.line(line)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _unexpected and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
