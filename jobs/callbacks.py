"""Job callbacks that cannot be turned against the service.

A callback URL is http(s) without `user:password@`, and it reaches only public addresses unless the
operator allows more (`CallbackPolicy.allow`: addresses, CIDRs or host names). It is checked twice: when
the job is submitted (the host as written, numeric spellings such as `2130706433` or `0x7f.1` read the way
the resolver reads them) and when the callback is sent (every address the name resolves to). The request
then goes to the address that was checked, with the original Host header and TLS server name, so a DNS
answer that changes in between (rebinding) is never used. Each callback has a total deadline, kept by
shutting its socket down (httpx's timeouts apply per read), and callbacks run on a few threads of their
own: a slow callback server never holds the claim loop.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from urllib.parse import unquote, urlsplit

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator

logger = logging.getLogger("longlive.jobs")
Address = IPv4Address | IPv6Address
Resolver = Callable[[str, int], list[str]]  # (host, port) -> addresses, as getaddrinfo answers
NUMERIC_HOST = re.compile(r"^[0-9a-fA-FxX.]+$")  # what inet_aton may read as an IPv4 address
NAT64 = IPv6Network("64:ff9b::/96")  # carries an IPv4 address in its low 32 bits
LOCALHOST = IPv4Address("127.0.0.1")
DEFAULT_PORTS = {"http": 80, "https": 443}


class CallbackRefused(ValueError):
    """The URL names a target callbacks may not reach (the message says why; it never holds userinfo)."""


class CallbackPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    allow: list[str] = Field(
        default_factory=list,
        description="non-public targets callbacks may reach: addresses, CIDRs or host names (127.0.0.1)",
    )
    deadline_s: float = Field(10, gt=0, le=300, description="one callback's whole time, answer included")
    workers: int = Field(2, ge=1, le=32, description="callbacks sent at once")
    backlog: int = Field(64, ge=1, description="callbacks queued or being sent; more are dropped (logged)")

    @field_validator("allow")
    @classmethod
    def _entries(cls, entries: list[str]) -> list[str]:
        for entry in entries:
            if network(entry) is None and not re.fullmatch(r"[A-Za-z0-9.-]+", entry):
                raise ValueError(f"{entry!r} is neither an address, a CIDR nor a host name")
        return entries

    def allowed(self, address: Address) -> bool:
        candidates = [address, *filter(None, [embedded_ipv4(address)])]
        return any(a in net for net in map(network, self.allow) if net is not None for a in candidates)

    def reachable(self, address: Address) -> bool:
        return self.allowed(address) or public(address)

    def refusal(self, url: str) -> str | None:
        """Why a job may not name this callback URL (None: it may): checked at submission, before any
        DNS lookup, so names are checked again once resolved (`pinned`)."""
        try:
            parsed = target(url)
        except CallbackRefused as refused:
            return str(refused)
        address = literal(parsed.host)
        if address is None and is_localhost(parsed.host) and hostname(parsed.host) not in self.allow:
            address = LOCALHOST
        if address is not None and not self.reachable(address):
            return f"{address} is not a public address"
        return None

    def pinned(self, url: str, resolve: Resolver) -> tuple[httpx.URL, Address]:
        """The URL and the one address to connect to: the host's addresses, every one of them checked.
        Raises CallbackRefused."""
        parsed = target(url)
        address = literal(parsed.host)
        if address is not None:
            addresses = [address]
        else:
            name = hostname(parsed.host)
            port = parsed.port or DEFAULT_PORTS[parsed.scheme]
            addresses = [a for a in map(literal, resolve(name, port)) if a is not None]
            if not addresses:
                raise CallbackRefused(f"{name} has no address")
            if name in self.allow:
                return parsed, addresses[0]
        for address in addresses:
            if not self.reachable(address):
                raise CallbackRefused(f"{address} is not a public address")
        return parsed, addresses[0]


def network(entry: str) -> IPv4Network | IPv6Network | None:
    try:
        return ip_network(entry, strict=False)
    except ValueError:
        return None


def target(url: str) -> httpx.URL:
    """The URL parsed the way the client parses it; only http(s) with a host and no userinfo."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        raise CallbackRefused("not a valid URL") from None
    if parsed.scheme not in DEFAULT_PORTS:
        raise CallbackRefused("only http and https callbacks")
    if parsed.userinfo:
        raise CallbackRefused("no user:password@ in a callback URL")
    if not parsed.host:
        raise CallbackRefused("a callback URL needs a host")
    return parsed


def hostname(host: str) -> str:
    return unquote(host).strip("[]").rstrip(".").lower()


def is_localhost(host: str) -> bool:
    name = hostname(host)
    return name == "localhost" or name.endswith(".localhost")  # RFC 6761: always loopback


def literal(host: str) -> Address | None:
    """The address the host spells, in any spelling the resolver accepts (`2130706433`, `0x7f.1`,
    `017700000001`, `127.1`, `[::ffff:127.0.0.1]`); None for a name."""
    host = hostname(host)
    try:
        return ip_address(host)
    except ValueError:
        pass
    if NUMERIC_HOST.match(host):
        try:
            return IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def embedded_ipv4(address: Address) -> IPv4Address | None:
    """The IPv4 address an IPv6 one carries (mapped, 6to4, NAT64): it is where the packets end up."""
    if not isinstance(address, IPv6Address):
        return None
    if address.ipv4_mapped or address.sixtofour:
        return address.ipv4_mapped or address.sixtofour
    if address in NAT64:
        return IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def public(address: Address) -> bool:
    """Globally routable unicast: not loopback, private, link-local, shared, multicast, reserved or
    unspecified (`::7f00:1`, IPv4-compatible, counts as reserved)."""
    inner = embedded_ipv4(address)
    if inner is not None:
        return public(inner)
    return address.is_global and not (address.is_multicast or address.is_reserved)


def system_resolver(host: str, port: int) -> list[str]:
    return list(dict.fromkeys(info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)))


def without_userinfo(url: str) -> str:
    """The URL as logs may show it: no `user:password@`."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


class Deadline:
    """Ends a request's connections when its time is up, whatever read or write they are in."""

    def __init__(self, seconds: float):
        self.sockets: list[socket.socket] = []
        self.expired = False
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()

    def trace(self, event: str, info: dict) -> None:
        """httpcore's trace extension: learns each socket as it is connected (or wrapped in TLS)."""
        if event not in ("connection.connect_tcp.complete", "connection.start_tls.complete"):
            return
        sock = info["return_value"].get_extra_info("socket")
        with self._lock:
            self.sockets.append(sock)
            if self.expired:
                shut(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self.sockets:
                shut(sock)


def shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)  # a blocked recv returns at once
    except OSError:
        pass  # closed already, or detached by the TLS wrapper


def deliver(
    url: str,
    body: dict,
    policy: CallbackPolicy,
    resolve: Resolver = system_resolver,
    transport: httpx.BaseTransport | None = None,
) -> int:
    """POST `body` as JSON to the URL's checked address within policy.deadline_s in all; returns the status
    (the answer's body is never read). Raises CallbackRefused, TimeoutError or httpx.HTTPError."""
    deadline = time.monotonic() + policy.deadline_s
    parsed, address = policy.pinned(url, resolve)
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the callback's deadline passed while resolving its host")
    extensions = {} if literal(parsed.host) else {"sni_hostname": parsed.host}
    # No proxies from the environment (they would resolve the name again), no redirects (a 307 to
    # 127.0.0.1 is a new, unchecked target).
    client = httpx.Client(
        transport=transport or httpx.HTTPTransport(trust_env=False),
        trust_env=False,
        follow_redirects=False,
        timeout=left,
    )
    with client, Deadline(left) as watch:
        request = client.build_request("POST", parsed, json=body, extensions=extensions)  # Host: the name
        request.extensions["trace"] = watch.trace
        request.url = parsed.copy_with(host=str(address))
        try:
            response = client.send(request, stream=True)
        except httpx.HTTPError:
            if watch.expired:
                raise TimeoutError(f"no answer within {policy.deadline_s:g} s") from None
            raise
        response.close()
        return response.status_code


class Callbacks:
    """Sends job callbacks on `policy.workers` threads beside the claim loop; at most `policy.backlog`
    wait. A failing callback is logged (the URL without userinfo) and never fails its job."""

    def __init__(
        self,
        policy: CallbackPolicy,
        resolve: Resolver = system_resolver,
        transport: Callable[[], httpx.BaseTransport] | None = None,
    ):
        self.policy, self.resolve, self.transport = policy, resolve, transport
        self._pool = ThreadPoolExecutor(policy.workers, thread_name_prefix="callback")
        self._slots = threading.Semaphore(policy.backlog)

    def send(self, job_id: str, url: str, state: str) -> Future | None:
        """Queue the callback {job_id, state}; None when the backlog is full (dropped, logged)."""
        if not self._slots.acquire(blocking=False):
            logger.warning("job %s: callback dropped, %d waiting already", job_id, self.policy.backlog)
            return None
        future = self._pool.submit(self._send, job_id, url, {"job_id": job_id, "state": state})
        future.add_done_callback(lambda _: self._slots.release())
        return future

    def _send(self, job_id: str, url: str, body: dict) -> int | None:
        shown = without_userinfo(url)
        try:
            transport = self.transport() if self.transport else None
            status = deliver(url, body, self.policy, self.resolve, transport)
        except CallbackRefused as refused:
            logger.warning("job %s: callback %s refused: %s", job_id, shown, refused)
        except (TimeoutError, OSError, httpx.HTTPError) as err:  # not httpx's message: it holds the URL
            logger.warning("job %s: callback %s failed: %s", job_id, shown, type(err).__name__)
        else:
            if status >= 400:
                logger.warning("job %s: callback %s answered %d", job_id, shown, status)
            return status
        return None

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
