"""Generator: one replica per GPU, a thin shell over `longlive_core.live.LiveHost`.

The engine thread loops: read new prompt events of this replica's sessions from Redis, then
`host.run_once()` (paced block step). Requests only queue work on the host and read its chunks.
The text encoder runs inside each replica (umT5 on the same GPU, ~58 ms per new prompt on an H100;
cached per prompt), so a prompt costs no extra network hop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator

from ray import serve

from longlive_core.fmp4 import FragmentedMp4Encoder, JpegEncoder
from longlive_core.live import CapacityError, LiveHost, UnknownSessionError

from .config import ServiceConfig
from .store import ReplicaEvents

logger = logging.getLogger("longlive.generator")
PREEMPT_WAIT_STEPS = 200  # x 50 ms: a block step on the slowest supported device


class SessionNotHere(Exception):
    """The session is not on this replica (unknown, or its replica is gone)."""


class ReplicaFull(Exception):
    """This replica runs its maximum number of sessions."""


def build_host(config: ServiceConfig) -> LiveHost:
    from longlive_core import LongLivePipeline
    from longlive_core.config import RuntimeConfig

    runtime = RuntimeConfig(compile=config.compile, low_memory=config.low_memory)
    pipe = LongLivePipeline.from_pretrained(config.model, device=config.device, runtime=runtime)
    return LiveHost(
        pipe,
        max_sessions=config.max_sessions,
        size=config.size,
        lead_seconds=config.lead_seconds,
        buffer_blocks=config.buffer_blocks,
        idle_timeout_s=config.idle_timeout_s,
        playback_speed=config.playback_speed,
    )


class Generator:
    def __init__(self, config: dict):
        self.config = ServiceConfig(**config)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.host = build_host(self.config)
        self.host.warm_up()
        self.events = ReplicaEvents(self.config.redis_url, self.replica_id)
        self.events.set_free_slots(self.host.max_sessions)
        self.jobs = build_job_worker(self.config, self.host, self.replica_id) if self.config.jobs else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._engine_loop, name="engine", daemon=True)
        self._thread.start()

    # -- requests ----------------------------------------------------------------------------------
    async def create(self, session_id: str, prompt: str, seed: int, max_seconds: float | None) -> dict:
        try:
            await self._admit(session_id, prompt, seed, max_seconds)
        except CapacityError as err:
            self._publish_free_slots()  # so the retry's routing sees this replica as full
            raise ReplicaFull(str(err)) from None
        self.events.follow(session_id)
        self._publish_free_slots()  # at once, before the next create is routed
        return {"replica": self.replica_id}

    async def _admit(self, session_id: str, prompt: str, seed: int, max_seconds: float | None) -> None:
        """Open a live session; a batch job holding the last slot is preempted (requeued) for it."""
        try:
            self.host.open(session_id, prompt, seed=seed, max_seconds=max_seconds)
            return
        except CapacityError:
            if self.jobs is None or self.jobs.running is None:
                raise
        self.jobs.preempt.set()
        try:
            for _ in range(PREEMPT_WAIT_STEPS):  # the job leaves at its next block
                await asyncio.sleep(0.05)
                if self.host.load < self.host.max_sessions:
                    break
            self.host.open(session_id, prompt, seed=seed, max_seconds=max_seconds)
        finally:
            self.jobs.preempt.clear()

    async def status(self, session_id: str) -> dict:
        return {**self._call(self.host.status, session_id), "replica": self.replica_id}

    async def end(self, session_id: str) -> None:
        self._call(self.host.close, session_id)

    async def stream(self, session_id: str, fmt: str = "mp4") -> AsyncIterator[bytes]:
        """fMP4: the init segment + one fragment per block; jpeg: one JPEG per frame."""
        self._call(self.host.status, session_id)
        width, height = self.host.width, self.host.height
        encoder = FragmentedMp4Encoder(width, height) if fmt == "mp4" else JpegEncoder(width, height)
        while True:
            chunk = await asyncio.to_thread(self._next_chunk, session_id)
            if chunk is None:
                return
            if fmt == "mp4":
                yield await asyncio.to_thread(encoder.encode_block, chunk.frames)
            else:
                for frame in chunk.frames:
                    yield await asyncio.to_thread(encoder.encode, frame)

    async def info(self) -> dict:
        return {"replica": self.replica_id, "load": self.host.load, "capacity": self.config.max_sessions}

    def check_health(self) -> None:
        if not self._thread.is_alive():
            raise RuntimeError("engine thread died")

    def __del__(self) -> None:
        self._stop.set()
        if self.jobs is not None:
            self.jobs.stop.set()

    # -- internals ---------------------------------------------------------------------------------
    def _publish_free_slots(self) -> None:
        self.events.set_free_slots(self.host.max_sessions - self.host.load)

    def _next_chunk(self, session_id: str):
        try:
            return self.host.next_chunk(session_id, timeout=self.config.idle_timeout_s)
        except (UnknownSessionError, TimeoutError):
            return None

    @staticmethod
    def _call(method, session_id: str):
        try:
            return method(session_id)
        except UnknownSessionError:
            raise SessionNotHere(session_id) from None

    def _engine_loop(self) -> None:
        published = -1
        while not self._stop.is_set():
            try:
                for session_id, event in self.events.poll():
                    if event.get("type") == "prompt":
                        try:
                            self.host.post_prompt(session_id, event["prompt"])
                        except (UnknownSessionError, ValueError) as err:
                            logger.warning("session %s: event not applied: %s", session_id, err)
                self.host.run_once()
                for session_id in [sid for sid in self.events.positions if sid not in self.host.sessions]:
                    self.events.unfollow(session_id)
                if self.host.load != published:  # admission reads it: keep it current
                    published = self.host.load
                    self._publish_free_slots()
            except Exception:
                logger.exception("engine loop failed")
                raise


def build_job_worker(config: ServiceConfig, host: LiveHost, replica_id: str):
    from jobs.queue import JobQueue
    from jobs.storage import LocalStore, S3Store
    from jobs.worker import JobWorker

    queue = JobQueue(config.redis_url, config.job_max_attempts, config.job_stale_after_s)
    store = (
        S3Store(config.s3_bucket, config.s3_endpoint_url)
        if config.s3_bucket
        else LocalStore(config.store_dir)
    )
    worker = JobWorker(
        host,
        queue,
        store,
        replica_id,
        spool_dir=config.spool_dir,
        retry_s=config.upload_retry_s,
        retry_max_s=config.upload_retry_max_s,
    )
    worker.start()
    return worker


def generator_deployment(config: ServiceConfig):
    from ray.serve.config import RequestRouterConfig

    from .router import SessionRouter

    return serve.deployment(
        Generator,
        name="Generator",
        num_replicas=config.num_replicas,
        ray_actor_options={"num_cpus": config.replica_cpus, "num_gpus": config.replica_gpus},
        max_ongoing_requests=4 * config.max_sessions + 16,  # each live stream holds one
        graceful_shutdown_timeout_s=config.graceful_shutdown_timeout_s,
        health_check_period_s=5,
        request_router_config=RequestRouterConfig(
            request_router_class=SessionRouter, request_router_kwargs={"redis_url": config.redis_url}
        ),
    )
