"""The web page (deployments/web/) in headless Chromium against a real `longlive serve` (local_serve.py).

Debian's chromium (apt; .ci/run installs it) driven by Playwright with executable_path: never a Playwright
download. Screenshots and downloads go to $LONGLIVE_ARTIFACTS, else a temp directory; the path is printed.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import av
import pytest
from fastapi import FastAPI, WebSocket
from fastapi.testclient import TestClient
from playwright.sync_api import sync_playwright
from starlette.websockets import WebSocketDisconnect

from deployments.config import ServiceConfig
from deployments.security import install
from deployments.webpage import ASSETS, CSP, WEB_DIR, web_file
from tests.serving import running_redis

TIMEOUT_MS = 60_000
PLAYER = "document.querySelector('#player')"
VIDEO = "document.querySelector('#video')"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    directory = Path(os.environ.get("LONGLIVE_ARTIFACTS") or tmp_path_factory.mktemp("web-artifacts"))
    directory.mkdir(parents=True, exist_ok=True)
    print(f"\nweb page screenshots and downloads: {directory}")
    return directory


@pytest.fixture(scope="module")
def browser():
    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail("Debian's chromium is not installed: apt-get install -y chromium (.ci/run does)", False)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable)
        yield browser
        browser.close()


def open_page(browser, base: str, init_script: str | None = None, **context_options):
    context = browser.new_context(accept_downloads=True, **context_options)
    if init_script:
        context.add_init_script(init_script)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(f"{base}/")
    return context, page, errors


def start_session(page, prompt: str) -> None:
    page.fill("#prompt", prompt)
    page.click("#start")
    page.wait_for_function(f"() => {PLAYER}.dataset.state === 'live'")
    assert page.is_hidden("#error"), page.inner_text("#error")


def test_page_plays_a_live_session_through_mse_takes_a_prompt_and_downloads(local_serve, browser, artifacts):
    context, page, errors = open_page(browser, local_serve.base, viewport={"width": 1280, "height": 800})
    start_session(page, "a red robot in a rainy city")

    # 1. Media Source Extensions, not the fallback: a blob: source fed by a SourceBuffer, playing.
    assert page.get_attribute("#player", "data-mode") == "mse"
    page.wait_for_function(f"() => {VIDEO}.currentTime > 0.5")
    assert page.evaluate(
        f"{VIDEO}.src.startsWith('blob:') && window.longlive.live().player.sourceBuffer !== null"
    )
    before = page.evaluate(f"{VIDEO}.currentTime")
    page.wait_for_function(f"() => {VIDEO}.currentTime > {before + 0.5}")
    assert page.evaluate(f"{VIDEO}.getVideoPlaybackQuality().totalVideoFrames") > 0
    page.screenshot(path=artifacts / "live-mse.png")

    # 2. A second prompt shows on the timeline with the block it took effect at.
    page.fill("#prompt", "the robot walks into a forest")
    page.click("#send")
    page.wait_for_function("() => document.querySelectorAll('#timeline li')[1]?.dataset.state === 'applied'")
    first, second = page.locator("#timeline li").nth(0), page.locator("#timeline li").nth(1)
    assert first.get_attribute("data-block") == "0"
    block = int(second.get_attribute("data-block"))
    assert block >= 1
    assert "the robot walks into a forest" in second.inner_text() and f"block {block}" in second.inner_text()
    # The page read the block's first frame from its fragment (mfhd, tfdt): 1 + 4 * (3 * block - 1).
    start = 12 * block - 3
    page.wait_for_function(f"() => window.longlive.live().blockStarts.has({block})")
    assert page.evaluate(f"window.longlive.live().blockStarts.get({block})") == start
    page.wait_for_function(f"() => {VIDEO}.currentTime > {start / 16}")  # played into the new block
    page.wait_for_function("() => document.querySelector('#r-prompt').textContent.endsWith(' s')")
    assert "on screen after" in second.inner_text()
    page.screenshot(path=artifacts / "live-second-prompt.png")

    # 3. The video so far, downloaded, decodes: every frame the page received.
    received = page.evaluate("window.longlive.live().framesReceived")
    with page.expect_download() as download:
        page.click("#download")
    path = artifacts / "live.mp4"
    download.value.save_as(path)
    received_after = page.evaluate("window.longlive.live().framesReceived")
    with av.open(str(path)) as container:
        frames = sum(1 for _ in container.decode(video=0))
    assert 16 < received <= frames <= received_after  # a block may arrive while the file is made

    page.click("#stop")
    page.wait_for_function(f"() => {PLAYER}.dataset.state === 'ended'")
    assert not errors, errors
    context.close()


def test_without_mse_the_page_falls_back_to_jpeg_frames_on_a_phone_sized_screen(
    local_serve, browser, artifacts
):
    phone = {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True}
    no_mse = "delete window.MediaSource; delete window.ManagedMediaSource;"
    context, page, errors = open_page(browser, local_serve.base, no_mse, **phone)
    assert page.evaluate("typeof window.MediaSource") == "undefined"
    start_session(page, "a lighthouse at dusk")
    assert page.get_attribute("#player", "data-mode") == "jpeg"
    page.wait_for_function(f"() => Number({PLAYER}.dataset.framesShown) > 16")
    assert page.evaluate("document.querySelector('#canvas').width") == 48
    assert page.is_hidden("#video")
    # Nothing wider than the screen.
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    page.screenshot(path=artifacts / "phone-jpeg.png", full_page=True)

    with page.expect_download() as download:
        page.click("#download")
    path = artifacts / "phone.mjpeg"
    download.value.save_as(path)
    with av.open(str(path), format="mjpeg") as container:
        assert sum(1 for _ in container.decode(video=0)) > 16

    page.click("#stop")
    page.wait_for_function(f"() => {PLAYER}.dataset.state === 'ended'")
    assert not errors, errors
    context.close()


def test_batch_tab_submits_a_schedule_and_follows_the_job(local_serve, browser, artifacts):
    context, page, errors = open_page(browser, local_serve.base, viewport={"width": 1280, "height": 800})
    page.click("#tab-batch")
    rows = page.locator("#schedule tbody tr")
    rows.nth(0).locator(".text").fill("a cat on a sofa")
    rows.nth(1).locator(".at").fill("1")
    rows.nth(1).locator(".text").fill("the cat falls asleep")
    page.fill("#job-seconds", "2")
    page.click("#submit-job")
    page.wait_for_function("() => document.querySelector('#job').dataset.state === 'done'")
    assert page.evaluate("document.querySelector('#job-progress').value") == 1
    assert "33 / 33 frames" in page.inner_text("#job-detail")
    # The local store's video: a link to the service's token-checked route, which the page can follow.
    href = page.get_attribute("#job-link", "href")
    assert href.startswith(f"{local_serve.base}/v1/jobs/") and "/video.mp4?token=" in href
    video = page.request.get(href)
    assert video.ok and video.headers["content-type"] == "video/mp4"
    with av.open(io.BytesIO(video.body())) as container:
        assert sum(1 for _ in container.decode(video=0)) == 33
    assert page.is_hidden("#live")
    page.screenshot(path=artifacts / "batch.png", full_page=True)
    assert not errors, errors
    context.close()


# -- the page's routes under the guard: no API key for the page; a WebSocket may pass it as ?api_key= -------
def test_the_page_needs_no_api_key_and_websockets_take_it_as_a_query_parameter(tmp_path):
    app = FastAPI()
    guard = install(app)
    app.get("/")(web_file)
    app.get("/web/{name}")(web_file)

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("hi")
        await websocket.close()

    @app.get("/api")
    async def api() -> dict:
        return {}

    with running_redis(tmp_path) as redis:
        guard.configure(ServiceConfig(redis_url=redis.url, api_keys=["k-one"]))
        with TestClient(app) as client:
            page = client.get("/")
            assert page.status_code == 200 and 'src="web/app.js"' in page.text
            assert page.headers["content-security-policy"] == CSP
            for name, media_type in ASSETS.items():
                asset = client.get(f"/web/{name}")
                assert asset.status_code == 200 and asset.headers["content-type"].startswith(media_type)
            assert client.get("/web/webpage.py").status_code == 404  # only the listed files
            assert client.get("/api?api_key=k-one").status_code == 401  # HTTP: the header only
            assert client.get("/api", headers={"x-api-key": "k-one"}).status_code == 200
            with client.websocket_connect("/ws?api_key=k-one") as socket:
                assert socket.receive_text() == "hi"
            for query in ("", "?api_key=wrong"):
                with pytest.raises(WebSocketDisconnect) as refused:
                    with client.websocket_connect(f"/ws{query}") as socket:
                        socket.receive_text()
                assert refused.value.code == 4401
    # Every file of the page is served (and packaged: pyproject's package-data takes web/*.html|js|css).
    assert sorted(p.name for p in WEB_DIR.iterdir()) == sorted(ASSETS)
