"""The thread that steps a StreamingRuntime: it warms the runtime up on itself, then steps until stopped.

The warm-up runs on the stepping thread because CUDA libraries keep per-thread state: a thread's first
step creates its cuBLAS and cuDNN handles and their plans. Warmed up on another thread, the first session
served paid for that: its first block's DiT took 392 ms instead of 206 ms on an H200
(bench/results/first_step_thread_h200.md).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

from .live import StreamingRuntime

logger = logging.getLogger(__name__)


class EngineThread:
    """`start()` returns once the warm-up is done (raising what it raised); `stop()` ends the loop.

    warm_up_sessions: batch sizes the warm-up runs, 1..this (None: max_sessions; 0: no warm-up).
    on_error: called with the exception that ended the loop (a bug: the runtime fails sessions, not the
    loop), after it is logged."""

    def __init__(
        self,
        runtime: StreamingRuntime,
        warm_up_sessions: int | None = None,
        on_error: Callable[[BaseException], None] | None = None,
        name: str = "engine",
    ):
        self.runtime = runtime
        self.warm_up_sessions = warm_up_sessions
        self.on_error = on_error
        self.warm_up_seconds: float | None = None
        self._stop = threading.Event()
        self._warmed: Future[None] = Future()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._warmed.result()

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        started = time.monotonic()
        try:
            if self.warm_up_sessions != 0:
                self.runtime.warm_up(self.warm_up_sessions)
        except BaseException as err:  # noqa: BLE001 - handed to start()'s caller
            self._warmed.set_exception(err)
            return
        self.warm_up_seconds = time.monotonic() - started
        self._warmed.set_result(None)
        try:
            while not self._stop.is_set():
                self.runtime.run_once()
        except BaseException as err:
            logger.exception("the engine loop failed (a bug)")
            if self.on_error is not None:
                self.on_error(err)
            raise
