"""`longlive serve` in a subprocess on loopback (tiny model, 48x32, its own redis-server), as a user runs it.

One start (~30 s of Ray on 2 cores) serves every test that takes the `local_serve` fixture (conftest.py):
test_cli_serve.py's session test and the web page's browser tests. It is stopped right after the last of
them, so its Ray never runs beside the `service` fixture's; stopping checks it took its redis-server down.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from deployments.local import redis_answers
from tests.serving import free_port, wait_ready

ROOT = Path(__file__).resolve().parents[1]


class LocalServe:
    def __init__(self, directory: Path):
        self.directory = directory
        self.redis_url = f"redis://127.0.0.1:{free_port()}/0"
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = directory / "serve.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> None:
        config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
        config["applications"][0]["args"].update(
            redis_url=self.redis_url, size=[48, 32], store_dir=str(self.directory / "videos")
        )
        path = self.directory / "serve_config.yaml"
        path.write_text(yaml.safe_dump(config))
        env = {**os.environ, "HOME": str(self.directory), "RAY_ADDRESS": ""}
        command = [sys.executable, "-m", "deployments.cli", "serve", "--config", str(path)]
        with self.log.open("wb") as log:  # a file, not a pipe nobody reads (Ray logs a lot)
            self.process = subprocess.Popen(
                [*command, "--port", str(self.port)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        try:
            wait_ready(self.base, timeout=timeout)
        except TimeoutError:
            raise TimeoutError(f"longlive serve not ready; its log: {self.log}\n{self.tail()}") from None

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def stop(self) -> None:
        """SIGINT (Ctrl-C), as a user stops it; then its redis-server must be gone too."""
        if self.process is None:
            return
        process, self.process = self.process, None
        process.send_signal(signal.SIGINT)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        assert not redis_answers(self.redis_url), "longlive serve left its redis-server running"
