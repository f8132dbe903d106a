"""Job callbacks (jobs/callbacks.py) against real HTTP servers on loopback: every refused spelling of a
non-public address is refused as written and after resolution, the request goes to the address that was
checked (the name is resolved once), and a server that trickles its answer is cut off at the deadline.
No test connects to a refused address: names go to a stub resolver, and the transport fails the test on
any connection but to the test's own server."""

from __future__ import annotations

import time

import httpx
import pytest

from jobs.callbacks import CallbackPolicy, CallbackRefused, Callbacks, deliver
from tests.serving import callback_server

# Callback URLs as a job may write them, each refused whatever the test config allows (127.0.0.1).
REFUSED_HTTP = [
    "http://0.0.0.0/",
    "http://0/",
    "http://0x7f.2/",
    "http://10.0.0.1/hook",
    "http://10.1/",  # 10.0.0.1, the way inet_aton reads it
    "http://012.0.0.1/",  # octal: 10.0.0.1
    "http://167772161/",  # 10.0.0.1 as one number
    "http://172.16.0.1/",
    "http://192.168.1.1:8080/",
    "http://169.254.169.254/latest/meta-data/",
    "http://100.64.0.1/",
    "http://224.0.0.1/",
    "http://240.0.0.1/",
    "http://255.255.255.255/",
    "http://[::]/",
    "http://[::1]:6379/",
    "http://[::ffff:10.0.0.1]/",
    "http://[::ffff:a00:1]/",
    "http://[::a00:1]/",
    "http://[64:ff9b::a00:1]/",
    "http://[2002:a00:1::]/",
    "http://[fe80::1]/",
    "http://[fc00::1]/",
    "http://[ff02::1]/",
    "https://user:pass@example.com/hook",
    "http://user@93.184.216.34/",
]
# Loopback in any spelling: refused by a policy that allows nothing (the shipped default).
LOOPBACK = [
    "http://127.0.0.1:6379/",
    "http://2130706433/",
    "http://0x7f.1/",
    "http://0x7f000001/",
    "http://017700000001/",
    "http://127.1/",
    "http://127.0.0.1./",
    "http://[::ffff:127.0.0.1]/",
    "http://localhost/",
    "http://LOCALHOST./",
    "http://api.localhost/",
]
OTHER_SCHEMES = ["ftp://example.com/", "file:///etc/passwd", "gopher://127.0.0.1:6379/_INFO"]
PUBLIC = ["https://example.com/hook", "http://93.184.216.34:8080/x", "http://[2606:4700::1111]/"]
TEST_POLICY = CallbackPolicy(allow=["127.0.0.1"], deadline_s=2.5)
DEFAULT_POLICY = CallbackPolicy()


class OnlyTo(httpx.HTTPTransport):
    """A real transport that fails the test on a connection to any address but `allowed`."""

    def __init__(self, allowed: str):
        super().__init__(trust_env=False)
        self.allowed, self.connections, self.violations = allowed, [], []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.connections.append(request.url.host)
        if request.url.host != self.allowed:
            self.violations.append(str(request.url))
            raise AssertionError(f"connected to {request.url.host}")
        return super().handle_request(request)


class StubResolver:
    """Answers names from a table and counts the lookups; the real resolver is never asked."""

    def __init__(self, answers: dict[str, list[list[str]]]):
        self.answers, self.asked = answers, []

    def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append(host)
        return self.answers[host][min(len(self.asked), len(self.answers[host])) - 1]


@pytest.mark.parametrize("url", REFUSED_HTTP + OTHER_SCHEMES)
def test_refused_spellings_are_refused_as_written_and_when_sent(url):
    assert TEST_POLICY.refusal(url) is not None
    assert DEFAULT_POLICY.refusal(url) is not None
    transport = OnlyTo("127.0.0.1")
    with pytest.raises(CallbackRefused):
        deliver(
            url, {"job_id": "j"}, TEST_POLICY, StubResolver({"example.com": [["93.184.216.34"]]}), transport
        )
    assert transport.connections == []


@pytest.mark.parametrize("url", LOOPBACK)
def test_loopback_is_refused_unless_allowed(url):
    assert DEFAULT_POLICY.refusal(url) is not None
    transport = OnlyTo("127.0.0.1")
    resolver = StubResolver({"localhost": [["127.0.0.1"]], "api.localhost": [["127.0.0.1"]]})
    with pytest.raises(CallbackRefused):
        deliver(url, {}, DEFAULT_POLICY, resolver, transport)
    assert transport.connections == []
    assert TEST_POLICY.refusal(url) is None  # the test config allows 127.0.0.1 by name of its address


@pytest.mark.parametrize("url", PUBLIC)
def test_public_targets_pass_the_submission_check(url):
    assert DEFAULT_POLICY.refusal(url) is None


def test_names_are_checked_after_resolution_every_address():
    transport = OnlyTo("127.0.0.1")
    resolver = StubResolver(
        {"inside.example": [["10.0.0.7"]], "mixed.example": [["93.184.216.34", "192.168.0.2"]]}
    )
    for name in ("inside.example", "mixed.example"):
        url = f"https://{name}/hook"
        assert DEFAULT_POLICY.refusal(url) is None  # a name: nothing to check before it is resolved
        with pytest.raises(CallbackRefused):
            deliver(url, {}, DEFAULT_POLICY, resolver, transport)
    assert resolver.asked == ["inside.example", "mixed.example"] and transport.connections == []


def test_the_request_goes_to_the_checked_address_with_the_name_as_host():
    # The name resolves to the allowed loopback first and to a private address on any later lookup (a
    # rebinding DNS): the one lookup's address is where the request goes, the name is its Host header.
    with callback_server() as (recorder, port):
        resolver = StubResolver({"hooks.example": [["127.0.0.1"], ["10.0.0.1"]]})
        transport = OnlyTo("127.0.0.1")
        body = {"job_id": "abc", "state": "done"}
        status = deliver(f"http://hooks.example:{port}/done", body, TEST_POLICY, resolver, transport)
    assert status == 204
    assert recorder.received == [(f"hooks.example:{port}", body)]
    assert resolver.asked == ["hooks.example"] and transport.connections == ["127.0.0.1"]
    assert transport.violations == []


def test_a_trickling_server_is_cut_off_at_the_total_deadline():
    # One byte a second: each read is well within any per-read timeout, so only a total deadline ends it.
    with callback_server(trickle_s=1.0) as (recorder, port):
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            deliver(
                f"http://127.0.0.1:{port}/slow", {"job_id": "x"}, TEST_POLICY, transport=OnlyTo("127.0.0.1")
            )
        took = time.monotonic() - started
    assert recorder.received == [("127.0.0.1:" + str(port), {"job_id": "x"})]
    assert TEST_POLICY.deadline_s <= took < TEST_POLICY.deadline_s + 1.0


def test_callbacks_run_beside_the_caller_and_a_full_backlog_drops():
    policy = CallbackPolicy(allow=["127.0.0.1"], deadline_s=2.5, workers=1, backlog=2)
    with callback_server(trickle_s=1.0) as (recorder, port):
        callbacks = Callbacks(policy, transport=lambda: OnlyTo("127.0.0.1"))
        started = time.monotonic()
        sent = [callbacks.send(f"j{i}", f"http://127.0.0.1:{port}/slow", "done") for i in range(3)]
        assert time.monotonic() - started < 0.5  # queued, not sent, by the caller
        assert sent[2] is None  # the backlog holds two
        assert [f.result(timeout=10) for f in sent[:2]] == [None, None]  # both cut off, logged
        callbacks.shutdown()
    assert [body["job_id"] for _, body in recorder.received] == ["j0", "j1"]
