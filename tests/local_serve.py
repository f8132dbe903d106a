"""`longlive serve` in a subprocess on loopback (tiny model, 48x32), as a user runs it: no HOME or RAY_ADDRESS
of its own, its private redis-server, its own Ray; only its data folder is the test's.

One start (~30 s of Ray on 2 cores) serves every test that takes the `local_serve` fixture (conftest.py):
test_cli_serve.py's tests and the web page's browser tests. It is stopped right after the last of them,
so its Ray never runs beside the `service` fixture's; stopping checks that it exits within its drain and
leaves no process behind (its redis-server, raylet and workers included).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml

from deployments.local_redis import URL_FILE, redis_answers
from tests.serving import free_port, wait_ready

ROOT = Path(__file__).resolve().parents[1]
DRAIN_S = 3.0
EXIT_BOUND_S = DRAIN_S + 30  # the drain, then Serve's and Ray's own shutdown on a loaded 2-core machine


class LocalServe:
    def __init__(self, directory: Path, data_dir: Path | None = None):
        self.directory = directory
        self.data_dir = data_dir  # None: the launcher's default (under the user's home)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = directory / "serve.log"
        self.process: subprocess.Popen | None = None
        self.redis_url = ""

    def start(self, timeout: float = 180, wait: bool = True) -> None:
        config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
        # The tests are one client (127.0.0.1): more sessions at once than a client's default quota.
        config["applications"][0]["args"].update(size=[48, 32], max_sessions_per_client=8)
        path = self.directory / "serve_config.yaml"
        path.write_text(yaml.safe_dump(config))
        command = [sys.executable, "-m", "deployments.cli", "serve", "--config", str(path)]
        command += ["--port", str(self.port), "--drain", str(DRAIN_S)]
        if self.data_dir is not None:
            command += ["--data-dir", str(self.data_dir)]
        with self.log.open("wb") as log:  # a file, not a pipe nobody reads (Ray logs a lot)
            self.process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        if wait:
            self.wait(timeout)

    def wait(self, timeout: float = 180) -> None:
        try:
            wait_ready(self.base, timeout=timeout)
        except TimeoutError:
            raise TimeoutError(f"longlive serve not ready; its log: {self.log}\n{self.tail()}") from None
        self.redis_url = (self.instance_dir() / "redis" / URL_FILE).read_text().strip()

    def instance_dir(self) -> Path:
        from deployments.local import default_data_dir

        return self.data_dir or default_data_dir(self.port)

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def stop(self, how: signal.Signals = signal.SIGINT) -> float:
        """SIGINT (Ctrl-C) or SIGTERM, as a user or a service manager stops it; returns how long it took to
        exit, after checking that nothing it started is left and that its shutdown printed no traceback."""
        if self.process is None:
            return 0.0
        process, self.process = self.process, None
        started_by_it = psutil.Process(process.pid).children(recursive=True)
        before = len(self.tail(10**9))  # what it prints from the signal on is the shutdown's
        started = time.monotonic()
        process.send_signal(how)
        try:
            process.wait(EXIT_BOUND_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
            raise AssertionError(
                f"longlive serve did not exit within {EXIT_BOUND_S} s of {how.name}"
            ) from None
        took = time.monotonic() - started
        _, alive = psutil.wait_procs(started_by_it, timeout=5)
        left = [f"{p.pid} {p.name()}" for p in alive if p.status() != psutil.STATUS_ZOMBIE]
        assert not left, f"longlive serve left processes behind: {left}"
        assert not self.redis_url or not redis_answers(self.redis_url), "its redis-server is still up"
        shutdown = self.log.read_text(errors="replace")[before:]
        assert "Traceback" not in shutdown, shutdown[-4000:]
        return took
