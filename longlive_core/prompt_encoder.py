"""Text encoding off the engine thread: one worker thread, with its own CUDA stream, runs the text encoder
and its per-prompt cache, so a new prompt never holds up the block steps of other sessions."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import Tensor

from .text_encoder import TextEncoder


class PromptEncoder:
    """`submit(prompt)` -> a Future of its embedding [tokens, dim], ready for use on any CUDA stream.

    background=False: the engine thread encodes what was submitted when it calls `run_pending()`, at its
    next step: deterministic, for tests and scripts that step the runtime themselves.
    on_done (background): called once each prompt's future is done (on the encoder's thread, or on the
    submitting one when it was done at once), so whoever waits on an encoding (the engine thread's next
    step) wakes at once rather than at its next poll."""

    def __init__(
        self, encoder: TextEncoder, background: bool = False, on_done: Callable[[], None] | None = None
    ):
        self.encoder = encoder
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="text-encoder") if background else None
        on_cuda = encoder.device.type == "cuda"
        self._stream = torch.cuda.Stream(encoder.device) if background and on_cuda else None
        self._pending: list[tuple[Future[Tensor], str]] = []
        self._lock = threading.Lock()
        self._on_done = on_done
        self._busy = 0  # prompts submitted and not encoded yet

    @property
    def busy(self) -> bool:
        """Some prompt is being (or waits to be) encoded."""
        with self._lock:
            return self._busy > 0

    def submit(self, prompt: str) -> Future[Tensor]:
        with self._lock:
            self._busy += 1
        if self._pool is not None:
            future = self._pool.submit(self._encode, prompt)
            # After the result is set (or at once, on the caller's thread, when it is already done).
            future.add_done_callback(self._finished)
            return future
        future = Future()
        with self._lock:
            self._pending.append((future, prompt))
        return future

    def run_pending(self) -> None:
        """Inline mode: encode everything submitted so far (no-op with a background thread)."""
        with self._lock:
            pending, self._pending = self._pending, []
        for future, prompt in pending:
            try:
                future.set_result(self._encode(prompt))
            except Exception as err:  # noqa: BLE001 - handed to whoever reads the future, as the pool does
                future.set_exception(err)
            finally:
                with self._lock:
                    self._busy -= 1

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _finished(self, _: Future[Tensor]) -> None:
        with self._lock:
            self._busy -= 1
        if self._on_done is not None:
            self._on_done()

    @torch.no_grad()
    def _encode(self, prompt: str) -> Tensor:
        if self._stream is None:
            return self.encoder.encode(prompt)
        with torch.cuda.stream(self._stream):
            embeds = self.encoder.encode(prompt)
        self._stream.synchronize()  # blocks this thread only; the result is complete for every stream
        return embeds
