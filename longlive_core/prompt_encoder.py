"""Text encoding off the engine thread: one worker thread, with its own CUDA stream, runs the text encoder
and its per-prompt cache, so a new prompt never holds up the block steps of other sessions."""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import Tensor

from .text_encoder import TextEncoder


class PromptEncoder:
    """`submit(prompt)` -> a Future of its embedding [tokens, dim], ready for use on any CUDA stream.

    background=False: the engine thread encodes what was submitted when it calls `run_pending()`, at its
    next step: deterministic, for tests and scripts that step the runtime themselves."""

    def __init__(self, encoder: TextEncoder, background: bool = False):
        self.encoder = encoder
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="text-encoder") if background else None
        on_cuda = encoder.device.type == "cuda"
        self._stream = torch.cuda.Stream(encoder.device) if background and on_cuda else None
        self._pending: list[tuple[Future[Tensor], str]] = []
        self._lock = threading.Lock()

    def submit(self, prompt: str) -> Future[Tensor]:
        if self._pool is not None:
            return self._pool.submit(self._encode, prompt)
        future: Future[Tensor] = Future()
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

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    @torch.no_grad()
    def _encode(self, prompt: str) -> Tensor:
        if self._stream is None:
            return self.encoder.encode(prompt)
        with torch.cuda.stream(self._stream):
            embeds = self.encoder.encode(prompt)
        self._stream.synchronize()  # blocks this thread only; the result is complete for every stream
        return embeds
