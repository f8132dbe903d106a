"""The HTTP/WebSocket API against bad input and unauthorised use.

Property tests (hypothesis) against the real running service (tests/conftest.py `service`): random JSON
bodies, unicode (lone surrogates, NUL, emoji, RTL), huge and empty prompts, bad schedules, random paths
and headers never get a 500, every answer is JSON without a traceback or a file path, and afterwards the
Generator replicas still serve. Then: another session's or job's token gets 403 on every route; body
size (413) and rate limit (429) on the real service; API keys, Redis down (503), the last-resort 500 and
the forwarded-for rule on a small app with the same `deployments.security.install` (the moving window
and forwarded headers behind a real uvicorn: tests/test_abuse_limits.py).
"""

from __future__ import annotations

import json
import re
import time
import unicodedata
from urllib.parse import quote

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from deployments.config import ServiceConfig
from deployments.security import install, key_digest, rate_key
from tests.service_fixture import RATE_LIMIT, auth, created, decode
from tests.serving import free_port, running_redis

SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
FILE_PATH = re.compile(r"(/[\w.-]+){2,}\.py|site-packages|File \"")
SPECIAL = [
    "\x00",
    "\ud800",
    "\udfff",
    "\x1b",
    "\r",
    "\x7f",
    "\x85",
    "🎉",
    "👩‍👩‍👧",
    "\u202e",
    "مرحبا بالعالم",
]
SPECIAL += ["\n", "\t", " ", "\u200b", "\u3000", "a", "robot", "\\", '"', "{"]
PROMPTS = st.one_of(
    st.lists(st.sampled_from(SPECIAL), max_size=8).map("".join),
    st.text(st.characters(exclude_categories=()), max_size=40),  # every code point, surrogates too
    st.sampled_from(["", " ", "\n\t", "x" * 2000, "x" * 2001, "é" * 2000, "x" * 70_000]),
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def prompt_ok(prompt: object) -> bool:
    """The rule, written out independently of longlive_core.schedule.check_prompt."""
    if not isinstance(prompt, str) or not 1 <= len(prompt) <= 2000:
        return False
    for char in prompt:
        if unicodedata.category(char) in ("Cc", "Cs") and char not in "\n\t":
            return False
    return any(not c.isspace() and unicodedata.category(c) != "Cf" for c in prompt)


def send(method: str, url: str, body: object = None, raw: bytes | None = None, **kwargs) -> httpx.Response:
    """JSON as Python writes it (lone surrogates escaped, NaN allowed): what a careless client sends."""
    if raw is None and body is not None:
        raw = json.dumps(body).encode()
    headers = {"content-type": "application/json", **kwargs.pop("headers", {})}
    return httpx.request(method, url, content=raw, headers=headers, timeout=60, **kwargs)


def check_answer(response: httpx.Response, allowed: set[int]) -> dict | list | None:
    """Never a 500; a JSON body (unless 204) without a traceback or a file path."""
    assert response.status_code != 500 and response.status_code in allowed, (
        response.status_code,
        response.text[:500],
    )
    if response.status_code == 204:
        return None
    assert response.headers["content-type"].startswith("application/json"), response.headers
    assert "Traceback" not in response.text and not FILE_PATH.search(response.text), response.text[:500]
    return response.json()


@pytest.fixture(scope="module")
def live(service):
    """One session for the prompt properties; ended at the end of the module."""
    session = created(service["base"])
    yield session
    httpx.delete(f"{service['base']}/v1/sessions/{session['session_id']}", headers=auth(session["token"]))


# -- properties on the real service ----------------------------------------------------------------------
@SETTINGS
@given(prompt=PROMPTS)
def test_create_session_accepts_exactly_the_valid_prompts(service, prompt):
    base = service["base"]
    response = send("POST", f"{base}/v1/sessions", {"prompt": prompt, "max_seconds": 0.5})
    body = check_answer(response, {201, 413, 422, 503})
    if response.status_code == 201:
        httpx.delete(f"{base}/v1/sessions/{body['session_id']}", headers=auth(body["token"]), timeout=30)
    expected = 413 if len(json.dumps(prompt)) > 64 * 1024 else 201 if prompt_ok(prompt) else 422
    if response.status_code != 503:  # all replicas briefly full is allowed, never a wrong answer
        assert response.status_code == expected, (prompt[:50], response.text[:300])
    if response.status_code == 422:  # loc + msg only, never the input
        assert all(set(error) == {"loc", "msg"} for error in body["detail"]), body
        assert len(prompt) < 8 or prompt not in response.text


@SETTINGS
@given(prompt=PROMPTS)
def test_posted_prompts_are_taken_iff_valid_and_kept_verbatim(service, live, prompt):
    url = f"{service['base']}/v1/sessions/{live['session_id']}"
    response = send("POST", f"{url}/prompts", {"prompt": prompt}, headers=auth(live["token"]))
    check_answer(response, {202, 413, 422})
    expected = 413 if len(json.dumps(prompt)) > 64 * 1024 else 202 if prompt_ok(prompt) else 422
    assert response.status_code == expected, (prompt[:50], response.text[:300])
    if expected == 202:  # the engine reads it from the stream: the timeline has it, unchanged
        deadline = time.monotonic() + 30
        while prompt not in [
            p["prompt"] for p in httpx.get(url, headers=auth(live["token"])).json()["prompts"]
        ]:
            assert time.monotonic() < deadline, "posted prompt not in the timeline"
            time.sleep(0.05)


AT = st.one_of(st.floats(0, 1.5), st.sampled_from([-1, 0, 1e400, "soon", None, True]))
SECONDS = st.one_of(st.floats(0.1, 2), st.sampled_from([0, -1, 3600.5, 1e400, "2", None, []]))
KEYS = st.one_of(
    st.none(),
    st.text(st.sampled_from("ab09._:-"), min_size=1, max_size=12).map(lambda k: f"prop-{k}"),
    st.text(st.characters(exclude_categories=()), max_size=12),
    st.just("k" * 201),
)


def job_ok(body: dict) -> bool:
    schedule, seconds, key = body["schedule"], body["seconds"], body["idempotency_key"]
    if not isinstance(seconds, float) or not 0 < seconds <= 3600 or not 1 <= len(schedule) <= 500:
        return False
    if key is not None and not re.fullmatch(r"[A-Za-z0-9._:-]{1,200}", key):
        return False
    ats = [e["at"] for e in schedule]
    if not all(type(a) in (int, float) and 0 <= a < seconds for a in ats) or ats[0] != 0:
        return False
    return all(b > a for a, b in zip(ats, ats[1:], strict=False)) and all(
        prompt_ok(e["prompt"]) for e in schedule
    )


@SETTINGS
@given(
    entries=st.lists(st.tuples(AT, PROMPTS.filter(lambda p: len(p) < 3000)), max_size=5),
    seconds=SECONDS,
    key=KEYS,
    first_at_zero=st.booleans(),
)
def test_submit_job_accepts_exactly_the_valid_schedules(service, entries, seconds, key, first_at_zero):
    base = service["base"]
    schedule = [{"at": at, "prompt": prompt} for at, prompt in entries]
    if first_at_zero and schedule:
        schedule[0]["at"] = 0
    body = {"schedule": schedule, "seconds": seconds, "idempotency_key": key}
    response = send("POST", f"{base}/v1/jobs", body)
    answer = check_answer(response, {201, 422})
    if response.status_code == 201 and answer["token"]:  # a duplicate key returns no token
        cancel = httpx.delete(f"{base}/v1/jobs/{answer['job_id']}", headers=auth(answer["token"]), timeout=30)
        assert cancel.status_code == 202
    assert response.status_code == (201 if job_ok(body) else 422), (body, response.text[:300])


ROUTES = [
    ("POST", "/v1/sessions"),
    ("GET", "/v1/sessions/{sid}"),
    ("POST", "/v1/sessions/{sid}/prompts"),
    ("DELETE", "/v1/sessions/{sid}"),
    ("GET", "/v1/sessions/{sid}/video.mp4"),
    ("POST", "/v1/jobs"),
    ("GET", "/v1/jobs/{sid}"),
    ("DELETE", "/v1/jobs/{sid}"),
    ("PUT", "/v1/sessions"),
    ("GET", "/v1/{sid}"),
    ("POST", "/x/{sid}/y"),
]
RAW = st.one_of(
    st.binary(max_size=64),
    st.sampled_from(
        [b"", b"{", b"\xff\xfe", b'{"prompt": NaN}', b'{"prompt": "\xed\xa0\x80"}', b"[" * 5000 + b"]" * 5000]
    ),
    JSON.map(lambda v: json.dumps(v).encode()),
)


@SETTINGS
@given(
    route=st.sampled_from(ROUTES),
    sid=st.text(st.characters(exclude_categories=()), min_size=1, max_size=30),
    raw=RAW,
    token=st.text(
        st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=30
    ),
    content_type=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", ""]),
)
def test_random_paths_headers_and_bodies_never_fail_the_server(service, route, sid, raw, token, content_type):
    method, path = route
    url = service["base"] + path.replace("{sid}", quote(sid.encode("utf-8", "surrogatepass"), safe=""))
    headers = {"authorization": f"Bearer {token}".strip().encode("latin-1"), "content-type": content_type}
    response = httpx.request(method, url, content=raw, headers=headers, timeout=60)
    check_answer(response, {201, 400, 403, 404, 405, 413, 422, 503})
    if response.status_code == 201:  # a random body that happens to be valid: clean up
        made = response.json()
        kind = "sessions" if "session_id" in made else "jobs"
        made_id = made.get("session_id") or made["job_id"]
        if made.get("token"):
            httpx.delete(f"{service['base']}/v1/{kind}/{made_id}", headers=auth(made["token"]), timeout=30)


# -- tokens ------------------------------------------------------------------------------------------------
def test_another_sessions_or_jobs_token_gets_403_on_every_route(service):
    from websockets.sync.client import connect

    base = service["base"]
    a, b = created(base, max_seconds=2), created(base, max_seconds=2)
    job_body = {"schedule": [{"at": 0, "prompt": "a slow river"}], "seconds": 1}
    jobs = [httpx.post(f"{base}/v1/jobs", json=job_body, timeout=30).json() for _ in range(2)]
    b_url = f"{base}/v1/sessions/{b['session_id']}"
    for headers in (auth(a["token"]), {}, {"authorization": "Bearer"}, {"authorization": a["token"]}):
        assert httpx.get(b_url, headers=headers).status_code == 403
        posted = httpx.post(f"{b_url}/prompts", json={"prompt": "stolen"}, headers=headers)
        assert posted.status_code == 403
        assert httpx.get(f"{b_url}/video.mp4", headers=headers).status_code == 403
        assert httpx.delete(b_url, headers=headers).status_code == 403
    assert httpx.get(f"{b_url}/video.mp4", params={"token": a["token"]}).status_code == 403
    ws = f"{base.replace('http', 'ws', 1)}/v1/sessions/{b['session_id']}/stream"
    for query in (f"?token={a['token']}", ""):
        with pytest.raises(Exception, match="403|4403"):  # refused before the handshake completes
            with connect(ws + query, open_timeout=30) as socket:
                socket.recv(timeout=30)
    for job, other in (jobs, jobs[::-1]):
        url = f"{base}/v1/jobs/{other['job_id']}"
        assert httpx.get(url, headers=auth(job["token"])).status_code == 403
        assert httpx.delete(url, headers=auth(job["token"])).status_code == 403
        assert httpx.get(url).status_code == 403 and httpx.delete(url).status_code == 403
    # A session's token is no job's token, and the other way round.
    assert httpx.get(f"{base}/v1/jobs/{jobs[0]['job_id']}", headers=auth(a["token"])).status_code == 403
    assert httpx.get(b_url, headers=auth(jobs[0]["token"])).status_code == 403
    # Nothing above touched B: its owner still reads it, and its timeline has no foreign prompt.
    state = httpx.get(b_url, headers=auth(b["token"])).json()
    assert [p["prompt"] for p in state["prompts"]] == ["a red robot in a rainy city"]
    for s in (a, b):
        httpx.delete(f"{base}/v1/sessions/{s['session_id']}", headers=auth(s["token"]))
    for job in jobs:
        assert httpx.delete(f"{base}/v1/jobs/{job['job_id']}", headers=auth(job["token"])).status_code == 202


# -- body size and rate limit on the real service ----------------------------------------------------------
def test_bodies_over_the_limit_get_413_declared_or_chunked(service):
    base, limit = service["base"], ServiceConfig().max_body_bytes
    padded = json.dumps({"prompt": "a red robot", "pad": "x" * limit}).encode()
    declared = httpx.post(f"{base}/v1/sessions", content=padded, headers={"content-type": "application/json"})
    assert check_answer(declared, {413}) == {"detail": f"body over {limit} bytes", "code": "body_too_large"}

    def chunks():  # no Content-Length: httpx sends it chunked
        for i in range(0, len(padded), 4096):
            yield padded[i : i + 4096]

    chunked = httpx.post(f"{base}/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in chunked.request.headers
    check_answer(chunked, {413})
    # Just under the limit, chunked, is read and judged on its content (an unknown field: 422).
    small = json.dumps({"prompt": "a red robot", "pad": "x" * (limit - 100)}).encode()
    just_under = httpx.post(
        f"{base}/v1/jobs", content=iter([small]), headers={"content-type": "application/json"}
    )
    assert check_answer(just_under, {422}) and len(small) <= limit


def test_a_client_over_its_rate_limit_gets_429_with_retry_after(service):
    import redis

    base, client = service["base"], "203.0.113.7"  # a documentation address: only this test uses it
    bucket, key, now = redis.Redis.from_url(service["redis_url"]), rate_key(client, RATE_LIMIT), time.time()
    for start in range(0, RATE_LIMIT - 3, 10_000):  # its moving window holds RATE_LIMIT - 3 requests
        bucket.lpush(key, *[now] * min(10_000, RATE_LIMIT - 3 - start))
    bucket.expire(key, 60)
    headers = {"x-forwarded-for": f"{client}, 10.0.0.1"}  # the first entry is the client
    answers = [httpx.get(f"{base}/v1/sessions/none", headers=headers).status_code for _ in range(4)]
    assert answers == [404, 404, 404, 429]
    assert bucket.llen(key) == RATE_LIMIT  # every admitted request, in the shared Redis
    refused = httpx.get(f"{base}/v1/sessions/none", headers=headers)
    assert refused.status_code == 429 and 1 <= int(refused.headers["retry-after"]) <= 60
    assert check_answer(refused, {429}) == {"detail": "rate limit exceeded", "code": "rate_limited"}
    assert httpx.get(f"{base}/readyz", headers=headers).status_code == 200  # probes are not limited
    assert (
        httpx.get(f"{base}/v1/sessions/none", headers={"x-forwarded-for": "203.0.113.8"}).status_code == 404
    )
    assert httpx.get(f"{base}/v1/sessions/none").status_code == 404  # other clients unaffected


def test_the_generator_replicas_survived_and_still_stream(service):
    base = service["base"]
    ready = httpx.get(f"{base}/readyz", timeout=30)
    assert ready.status_code == 200, ready.text
    session = created(base, max_seconds=1)
    response = httpx.get(session["stream_url"], headers=auth(session["token"]), timeout=60)
    assert response.status_code == 200 and len(decode(response.content)) == 21


# -- the same guard on a small app: API keys, Redis down, the last-resort 500, forwarded-for --------------
class Echo(BaseModel):
    prompt: str


def small_app(**config) -> TestClient:
    app = FastAPI()
    guard = install(app)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.post("/echo")
    async def echo(body: Echo) -> dict:
        return {"prompt": body.prompt}

    @app.get("/boom")
    async def boom() -> dict:
        raise RuntimeError("secret detail in /srv/app/secret.py")

    @app.get("/redis")
    async def redis_call() -> dict:
        import redis.asyncio as aioredis

        return {"pong": await aioredis.from_url(f"redis://127.0.0.1:{free_port()}/0").ping()}

    guard.configure(ServiceConfig(**config))
    # Entered: one event loop for all its requests (the guard's Redis client lives on it).
    client = TestClient(app, raise_server_exceptions=False).__enter__()
    OPEN_CLIENTS.append(client)
    return client


OPEN_CLIENTS: list[TestClient] = []


@pytest.fixture(autouse=True)
def _close_small_apps():
    yield
    while OPEN_CLIENTS:
        OPEN_CLIENTS.pop().__exit__(None, None, None)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


def test_api_keys_plain_digest_or_env_guard_every_route_but_probes_and_docs(redis_url, monkeypatch):
    monkeypatch.delenv("LONGLIVE_API_KEYS", raising=False)
    open_app = small_app(redis_url=redis_url)
    assert open_app.post("/echo", json={"prompt": "hi"}).status_code == 200  # no keys: no key needed
    for keys, env in (
        (["k-one", f"sha256:{key_digest('k-two')}"], ""),
        ([], " k-one , sha256:" + key_digest("k-two")),
    ):
        monkeypatch.setenv("LONGLIVE_API_KEYS", env)
        client = small_app(redis_url=redis_url, api_keys=keys)
        for key in ("k-one", "k-two"):
            assert client.post("/echo", json={"prompt": "hi"}, headers={"x-api-key": key}).json() == {
                "prompt": "hi"
            }
        for headers in ({}, {"x-api-key": "k-three"}, {"x-api-key": ""}, {"x-api-key": key_digest("k-one")}):
            refused = client.post("/echo", json={"prompt": "hi"}, headers=headers)
            assert refused.status_code == 401
            assert refused.json() == {"detail": "missing or wrong X-API-Key", "code": "api_key_required"}
            assert client.get("/nowhere", headers=headers).status_code == 401  # unknown routes too
        for public in ("/healthz", "/docs", "/openapi.json"):
            assert client.get(public).status_code == 200
    # Config keys win over the env: with both set, only the config's are valid.
    monkeypatch.setenv("LONGLIVE_API_KEYS", "env-key")
    client = small_app(redis_url=redis_url, api_keys=["config-key"])
    assert client.get("/healthz").status_code == 200
    assert client.post("/echo", json={"prompt": "x"}, headers={"x-api-key": "env-key"}).status_code == 401
    assert client.post("/echo", json={"prompt": "x"}, headers={"x-api-key": "config-key"}).status_code == 200


def test_redis_down_is_503_unhandled_is_500_without_details_and_422_never_echoes(redis_url):
    client = small_app(redis_url=redis_url, rate_limit_per_minute=0)
    down = client.get("/redis")
    assert down.status_code == 503
    assert down.json() == {"detail": "storage unavailable, retry later", "code": "storage_unavailable"}
    assert down.headers["retry-after"] == "5"
    boom = client.get("/boom", headers={"x-request-id": "req-42"})
    assert boom.status_code == 500
    assert boom.json() == {"detail": "internal error", "code": "internal_error", "request_id": "req-42"}
    assert "secret" not in boom.text
    raw = json.dumps({"prompt": ["secret-value"], "secret-field-\ud800": 1}).encode()
    invalid = client.post("/echo", content=raw, headers={"content-type": "application/json"})
    assert invalid.status_code == 422 and "secret-value" not in invalid.text
    assert all(set(e) == {"loc", "msg"} for e in invalid.json()["detail"])
    # The rate limiter needs Redis too: with Redis down every limited request is a 503.
    dead = small_app(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    assert dead.post("/echo", json={"prompt": "hi"}).status_code == 503
    assert dead.get("/healthz").status_code == 200  # probes are not limited: liveness needs no Redis


def test_rate_limit_keys_by_the_peer_unless_forwarded_for_is_trusted(redis_url):
    import redis

    counter = redis.Redis.from_url(redis_url)
    for trusted, counted in ((False, "testclient"), (True, "198.51.100.9")):
        client = small_app(redis_url=redis_url, rate_limit_per_minute=2, trust_forwarded_for=trusted)
        counter.flushdb()
        headers = {"x-forwarded-for": "198.51.100.9, 10.1.1.1"}
        answers = [client.post("/echo", json={"prompt": "x"}, headers=headers) for _ in range(3)]
        assert [r.status_code for r in answers] == [200, 200, 429]
        assert 1 <= int(answers[2].headers["retry-after"]) <= 60
        assert counter.keys("ratelimit:*") == [rate_key(counted, 2).encode()]
