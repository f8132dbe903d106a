"""Can one token holder starve another viewer? A viewer's fragment rate with and without 20 extra
never-read HTTP streams and 20 never-read WebSockets on another session of the same replica.

Local Ray Serve, a redis-server and the shipped app (one Generator replica, real-time pacing). Session B's
viewer reads its stream for `--seconds`; first alone, then while session A's token holder opens the extra
streams and WebSockets and never reads them (those past the per-session bound are refused: counted).

    python bench/bench_starvation.py --out bench/results/starvation_cpu.md   # CPU, tiny model
"""

from __future__ import annotations

import argparse
import platform
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import command_line, emit  # noqa: E402
from longlive_core.fmp4 import _boxes  # noqa: E402

EXTRA = 20


def count_fragments(data: bytes) -> int:
    return sum(kind == b"moof" for kind, _, _ in _boxes(bytearray(data)))


def viewer_rate(base: str, seconds: float) -> float:
    """Fragments per second of a fresh session's viewer over `seconds` after its first fragment."""
    import httpx

    session = httpx.post(f"{base}/v1/sessions", json={"prompt": "a boat", "max_seconds": 600}, timeout=60)
    session = session.raise_for_status().json()
    headers = {"Authorization": f"Bearer {session['token']}"}
    data = b""
    with httpx.stream("GET", session["stream_url"], headers=headers, timeout=120) as response:
        pieces = response.iter_raw()
        data += next(pieces)
        started = time.monotonic()
        first = count_fragments(data)
        for piece in pieces:
            data += piece
            if time.monotonic() - started >= seconds:
                break
    httpx.delete(f"{base}/v1/sessions/{session['session_id']}", headers=headers, timeout=60)
    return (count_fragments(data) - first) / (time.monotonic() - started)


def attack(base: str, stop: threading.Event) -> dict:
    """Session A's token holder: EXTRA HTTP streams and EXTRA WebSockets, none of them read."""
    import httpx
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    session = httpx.post(f"{base}/v1/sessions", json={"prompt": "a cat", "max_seconds": 600}, timeout=60)
    session = session.raise_for_status().json()
    headers = {"Authorization": f"Bearer {session['token']}"}
    client = httpx.Client(timeout=60)
    counts = {"http_open": 0, "http_refused": 0, "ws_connected": 0, "ws_refused": 0}
    held = []
    for _ in range(EXTRA):
        response = client.send(
            client.build_request("GET", session["stream_url"], headers=headers), stream=True
        )
        kind = "http_open" if response.status_code == 200 else "http_refused"
        counts[kind] += 1
        held.append(response)  # never read
    ws_url = f"{session['websocket_url']}?token={session['token']}"
    for _ in range(EXTRA):
        try:  # past the bound the server accepts, then closes with 4429: a client that never reads
            held.append(connect(ws_url, open_timeout=30, max_queue=1))  # never read
            counts["ws_connected"] += 1
        except (InvalidStatus, OSError):
            counts["ws_refused"] += 1
    stop.wait()
    for h in held:
        h.close()
    client.close()
    httpx.delete(f"{base}/v1/sessions/{session['session_id']}", headers=headers, timeout=60)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import ray

    from tests.serving import local_service

    overrides = dict(
        size=[48, 32],
        warm_up_sessions=1,
        jobs=False,
        rate_limit_per_minute=0,
        max_sessions_per_client=4,
    )
    with local_service(overrides, 1, timeout=600) as (base, _, _):
        alone = viewer_rate(base, args.seconds)
        stop, counts = threading.Event(), {}
        attacker = threading.Thread(target=lambda: counts.update(attack(base, stop)), daemon=True)
        attacker.start()
        time.sleep(5)  # the streams are open
        attacked = viewer_rate(base, args.seconds)
        stop.set()
        attacker.join(120)
    rows = [
        "| viewer of session B | fragments / s | vs alone |",
        "|---|---|---|",
        f"| alone | {alone:.2f} | 100% |",
        f"| beside A's {EXTRA} never-read streams + {EXTRA} never-read WebSockets | {attacked:.2f} |"
        f" {attacked / alone:.0%} |",
    ]
    meta = [
        f"- device: CPU, tiny model; ray {ray.__version__};"
        f" host {platform.processor() or platform.machine()}",
        f"- command: `{command_line()}`",
        f"- one Generator replica, real-time pacing; each rate over {args.seconds:g} s after the first"
        " fragment;"
        f" A's streams: {counts.get('http_open')} HTTP open, {counts.get('http_refused')} refused;"
        f" {counts.get('ws_connected')} WebSockets connected (past the bound of 2 streams per session the"
        f" server closes them with 4429), {counts.get('ws_refused')} refused",
    ]
    emit("One token holder against another viewer: fragment rate", meta, rows, args.out)


if __name__ == "__main__":
    main()
