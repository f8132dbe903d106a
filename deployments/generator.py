"""Generator: one replica per GPU, a thin shell over `longlive_core.live.StreamingRuntime`.

Two threads: the engine thread only steps the host (`host.run_once()`, paced block steps); the Redis
thread moves new prompt events of this replica's sessions into the host, writes each live session's
checkpoint after every block and publishes the replica's free slots. Redis being away therefore never
stalls generation: live sessions go on from memory, and the Redis thread catches up when it returns.
Requests only queue work on the host and read its chunks. A request for a session this replica does
not hold restores it from its checkpoint (its old replica died or was drained; the router sent it here).
The text encoder runs inside each replica (umT5 on the same GPU, ~58 ms per new prompt on an H100;
cached per prompt), so a prompt costs no extra network hop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator

import redis
from ray import serve

from jobs.repeats import Repeats
from longlive_core.checkpoint import CheckpointError
from longlive_core.engine_thread import EngineThread
from longlive_core.fmp4 import FragmentedMp4Encoder, JpegEncoder
from longlive_core.live import (
    BlockGone,
    CapacityError,
    Chunk,
    SessionPhase,
    SessionView,
    StreamingRuntime,
    UnknownSessionError,
)
from longlive_core.schedule import block_of_frame

from .checkpoints import CheckpointStore
from .config import ServiceConfig
from .errors import FramesGone, ReplicaFull, SessionMoved, SessionNotHere, TooManyStreams
from .metrics import log, metrics
from .store import ReplicaEvents

logger = logging.getLogger("longlive.generator")
PREEMPT_WAIT_STEPS = 200  # x 50 ms: a block step on the slowest supported device
REDIS_AWAY = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
REDIS_PERIOD_S = 0.02  # the Redis thread's loop: prompt events reach the host within this
REDIS_RETRY_S = 0.5  # while Redis is away
SAMPLE_PERIOD_S = 1.0  # gauges, the replica's admin info and the queue depth
SESSION_FPS_PERIOD_S = 2.0
MOVED_REMEMBERED = 10_000


def build_host(config: ServiceConfig) -> StreamingRuntime:
    from longlive_core import LongLivePipeline
    from longlive_core.config import RuntimeConfig

    runtime = RuntimeConfig(compile=config.compile, low_memory=config.low_memory)
    pipe = LongLivePipeline.from_pretrained(config.model, device=config.device, runtime=runtime)
    return StreamingRuntime(
        pipe,
        background_encoding=True,
        realtime_margin=1.0 if config.realtime_admission else None,
        max_sessions=config.max_sessions,
        size=config.size,
        lead_seconds=config.lead_seconds,
        send_lead_seconds=config.send_lead_seconds,
        buffer_blocks=config.buffer_blocks,
        idle_timeout_s=config.idle_timeout_s,
        playback_speed=config.playback_speed,
        checkpoints=True,
    )


class Generator:
    def __init__(self, config: dict):
        self.config = ServiceConfig(**config)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.host = build_host(self.config)
        self.metrics = metrics()
        self._engine_metrics_bug = Repeats(logger, "engine metrics failed (a bug)")  # the engine thread's
        # Warmed up on the thread that then steps (CUDA handles are per thread): every batch size, so
        # nothing compiles while serving; the replica is ready once it returns.
        self.engine = EngineThread(self.host, self.config.warm_up_sessions, on_error=self._engine_failed)
        self.engine.start()
        self.events = ReplicaEvents(self.config.redis_url, self.replica_id)
        self.events.set_free_slots(self.host.max_sessions)
        self.checkpoints = CheckpointStore(self.config.redis_url, self.config.checkpoint_ttl_s)
        self.jobs = build_job_worker(self.config, self.host, self.replica_id) if self.config.jobs else None
        self.redis_ok = True
        self.metrics.capacity.set(self.host.max_sessions)
        self.log = log("longlive.generator", replica=self.replica_id)
        self.jobs_queued = 0
        self._opened: dict[str, float] = {}  # session -> when opened, until its first block is out
        self._posted: dict[tuple[str, int], float] = {}  # (session, prompt index) -> posted (wall time)
        self._rates = RateSampler()
        self._stalled_reported = 0
        self._remade_reported = 0
        self._replica_fps = 0.0
        if self.jobs is not None:
            self.jobs.on_finished = self._job_finished
        # Repeated errors are logged once, then counted; each tally belongs to one thread.
        self._redis_bug = Repeats(logger, "redis thread failed (a bug, not Redis)")
        self._metrics_bug = Repeats(logger, "metrics failed (a bug)")  # the Redis thread's
        self._job_metrics_bug = Repeats(logger, "job metrics failed (a bug)")  # the job worker's thread
        self._streams: dict[str, int] = {}  # session -> its open streams (the event loop's own)
        self._moved: dict[str, None] = {}  # sessions closed here as another replica owns them now (ordered)
        self._restoring = asyncio.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._redis_loop, name="redis", daemon=True)]
        for thread in self._threads:
            thread.start()

    # -- requests ----------------------------------------------------------------------------------
    async def create(self, session_id: str, prompt: str, seed: int, max_seconds: float | None) -> dict:
        try:
            await self._admit(session_id, prompt, seed, max_seconds)
            self._opened[session_id] = time.monotonic()
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
        await self._ensure(session_id)
        return {**self._call(self.host.status, session_id), "replica": self.replica_id}

    async def end(self, session_id: str) -> None:
        self._call(self.host.close, session_id)  # ended in Redis first by the ingress: never restored

    async def stream(
        self, session_id: str, fmt: str = "mp4", from_frame: int = 0, send_init: bool = True
    ) -> AsyncIterator[tuple[int, int, bytes]]:
        """(first frame, frames, bytes) pieces from exactly video frame `from_frame` on. fMP4: the init
        segment (unless send_init is False: continuing a stream) + one fragment per block, decode times
        counted from the session's start; jpeg: one JPEG per frame. Each stream reads every block at its
        own cursor. Raises FramesGone when `from_frame` has left the session's ring of blocks,
        TooManyStreams past max_streams_per_session."""
        await self._ensure(session_id, from_frame)
        if self._streams.get(session_id, 0) >= self.config.max_streams_per_session:
            raise TooManyStreams(f"the session has {self.config.max_streams_per_session} streams open")
        self._streams[session_id] = self._streams.get(session_id, 0) + 1
        try:
            async for piece in self._pieces(session_id, fmt, from_frame, send_init):
                yield piece
        finally:
            self._streams[session_id] -= 1
            if not self._streams[session_id]:
                del self._streams[session_id]

    async def _pieces(
        self, session_id: str, fmt: str, from_frame: int, send_init: bool
    ) -> AsyncIterator[tuple[int, int, bytes]]:
        width, height = self.host.width, self.host.height
        encoder = None
        block = block_of_frame(from_frame, self.host.config.block_frames)
        async for chunk in self._blocks(session_id, block):
            skip = max(0, from_frame - chunk.first_frame)  # a resume inside a block starts at its frame
            first, frames = chunk.first_frame + skip, chunk.frames[skip:]
            if fmt == "jpeg":
                encoder = encoder or JpegEncoder(width, height)
                for i, frame in enumerate(frames):
                    yield first + i, 1, await asyncio.to_thread(encoder.encode, frame)
                continue
            if encoder is None:
                encoder = FragmentedMp4Encoder(
                    width, height, start_frame=first, start_fragment=chunk.block, send_init=send_init
                )
            data = await asyncio.to_thread(encoder.encode_block, frames)
            yield first, len(frames), data
        if session_id in self._moved:
            raise SessionMoved(session_id)

    async def _blocks(self, session_id: str, block: int) -> AsyncIterator[Chunk]:
        """The session's blocks from `block` on, as they are delivered. Waiting holds no thread: the
        runtime wakes an asyncio event (watch). Ends with the session, or when no block came for
        idle_timeout_s."""
        loop = asyncio.get_running_loop()
        delivered = asyncio.Event()
        try:
            unwatch = self.host.watch(session_id, lambda: loop.call_soon_threadsafe(delivered.set))
        except UnknownSessionError:
            return
        try:
            while True:
                delivered.clear()  # before the read: a block delivered after it sets the event again
                try:
                    chunk = self.host.read_block(session_id, block, timeout=0)
                except TimeoutError:  # not made yet
                    try:
                        await asyncio.wait_for(delivered.wait(), self.config.idle_timeout_s)
                    except TimeoutError:
                        return
                    continue
                except BlockGone as gone:
                    raise FramesGone(gone.oldest_frame) from None
                except UnknownSessionError:
                    return
                if chunk is None:
                    return
                yield chunk
                block += 1
        finally:
            unwatch()

    async def info(self) -> dict:
        return {
            "replica": self.replica_id,
            "load": self.host.load,
            "capacity": self.config.max_sessions,
            "redis": self.redis_ok,
        }

    def record_autoscaling_stats(self) -> dict[str, float]:
        """What the custom autoscaling policy reads (deployments/autoscaling.py), every few seconds."""
        return {
            "slots_used": self.host.load,
            "sessions": len(self._live_sessions()),
            "capacity": self.host.max_sessions,
            "jobs_queued": self.jobs_queued,
        }

    def check_health(self) -> None:
        # Redis being away is not a replica failure (a restart would lose its live sessions).
        if not self.engine.alive:
            raise RuntimeError("engine thread died")
        for thread in self._threads:
            if not thread.is_alive():
                raise RuntimeError(f"{thread.name} thread died")

    def __del__(self) -> None:
        self._stop.set()
        self.engine.stop(timeout=0)
        if self.jobs is not None:
            self.jobs.stop.set()

    # -- internals ---------------------------------------------------------------------------------
    def _publish_free_slots(self) -> None:
        self.events.set_free_slots(self.host.max_sessions - self.host.load)

    async def _ensure(self, session_id: str, from_frame: int | None = None) -> None:
        """Restore a session that moved here from its checkpoint, unless this replica holds it."""
        if self.host.has_session(session_id):
            return
        async with self._restoring:
            if self.host.has_session(session_id):
                return
            checkpoint = await asyncio.to_thread(self.checkpoints.load, session_id)
            if checkpoint is None:
                raise SessionNotHere(session_id)
            last_event_id = checkpoint.last_event_id
            # Prompts posted after the checkpoint (up to now) come back with it, so the restore applies
            # each of them instead of letting the newest supersede the others.
            events = await asyncio.to_thread(self.events.read_after, session_id, last_event_id)
            recovered = [
                (fields["prompt"], event_id)
                for event_id, fields in events
                if fields.get("type") == "prompt" and fields.get("prompt", "").strip()
            ]
            if events:
                last_event_id = events[-1][0]
            try:
                block = self.host.restore(checkpoint, from_frame or None, recovered)
            except CheckpointError as err:
                self.log.warning("not restored: %s", err, extra={"session_id": session_id})
                self.metrics.error("generator", "restore")
                raise SessionNotHere(session_id) from None
            except CapacityError as err:
                raise ReplicaFull(str(err)) from None
            self.events.follow(session_id, after=last_event_id)
            self.log.warning(
                "session moved here: resumes at block %d of %d",
                block,
                checkpoint.blocks_done,
                extra={"session_id": session_id},
            )

    @staticmethod
    def _call(method, session_id: str):
        try:
            return method(session_id)
        except UnknownSessionError:
            raise SessionNotHere(session_id) from None

    def _engine_failed(self, _: BaseException) -> None:
        """The engine loop ended on a bug (logged by EngineThread); check_health then fails the replica."""
        self._guarded(lambda: self.metrics.error("generator", "engine"), self._engine_metrics_bug)

    def _redis_loop(self) -> None:
        """Prompt events in, checkpoints and free slots out. Redis away (redis-py's ConnectionError or
        TimeoutError): retry until it is back; what happened meanwhile (events posted, blocks made) is
        caught up then. Any other exception is a bug: logged with its traceback, counted as one, and the
        loop goes on."""
        saved: dict[str, int] = {}  # session -> blocks_done of its last checkpoint written
        published = -1
        next_sample = 0.0
        while not self._stop.is_set():
            self._guarded(self._observe_latencies, self._metrics_bug)
            try:
                if time.monotonic() >= next_sample:
                    next_sample = time.monotonic() + SAMPLE_PERIOD_S
                    self._guarded(self._record_metrics, self._metrics_bug)
                    self._publish_info()
                    self._publish_free_slots()  # also the heartbeat that keeps its load entry
                self._sync(saved)
                if self.host.load != published:  # admission reads it: keep it current
                    self._publish_free_slots()
                    published = self.host.load
                if not self.redis_ok:
                    logger.warning("redis is back")
                    self.redis_ok = True
                time.sleep(REDIS_PERIOD_S)
            except REDIS_AWAY as err:
                if self.redis_ok:
                    logger.warning("redis unavailable, sessions go on from memory: %s", err)
                    self.redis_ok = False
                    self._guarded(lambda: self.metrics.error("generator", "redis"), self._metrics_bug)
                published = -1
                time.sleep(REDIS_RETRY_S)
            except Exception as err:  # noqa: BLE001 - a bug, not Redis: logged once, counted, replica kept
                self._redis_bug.failed(err, traceback=True)
                self._guarded(lambda: self.metrics.error("generator", "bug"), self._metrics_bug)
                time.sleep(REDIS_RETRY_S)
            else:
                self._redis_bug.ok()

    @staticmethod
    def _guarded(call, tally: Repeats) -> None:
        """Metrics never raise into a serving thread; `tally` is the calling thread's."""
        try:
            call()
        except Exception as err:  # noqa: BLE001 - a metrics bug must not stop serving; logged as a bug
            tally.failed(err, traceback=True)

    def _sync(self, saved: dict[str, int]) -> None:
        for session_id, event_id, event in self.events.poll():
            if event.get("type") == "prompt":
                try:
                    index = self.host.post_prompt(session_id, event["prompt"], event_id=event_id)
                except (UnknownSessionError, ValueError) as err:
                    self.log.warning("event not applied: %s", err, extra={"session_id": session_id})
                    continue
                self._posted[(session_id, index)] = _posted_at(event)
        views = {v.session_id: v for v in self.host.snapshot()}
        for session_id in self.events.followed():
            view = views.get(session_id)
            if view is None or view.ended:
                if session_id not in self._moved:
                    # Ended here (its client, max_seconds, idle, a failure): nothing to restore elsewhere,
                    # and the ingress refuses its prompts from now on.
                    self.events.mark_ended(session_id)
                self.events.unfollow(session_id)
                self.checkpoints.forget(session_id)
                saved.pop(session_id, None)
                continue
            if saved.get(session_id) == view.blocks_done:
                continue
            if self.checkpoints.save(self.host.checkpoint(session_id), self.replica_id):
                saved[session_id] = view.blocks_done
            else:  # ended by its client, or moved to another replica meanwhile
                self.log.warning("no longer ours, closing it here", extra={"session_id": session_id})
                self._moved[session_id] = None
                if len(self._moved) > MOVED_REMEMBERED:
                    del self._moved[next(iter(self._moved))]
                self.host.close(session_id)

    # -- metrics -----------------------------------------------------------------------------------
    def _live_sessions(self) -> list[SessionView]:
        return [v for v in self.host.snapshot() if v.paced and not v.ended]

    def _observe_latencies(self) -> None:
        """Time to first frame and prompt-switch latency, seen within REDIS_PERIOD_S of the block."""
        views = {v.session_id: v for v in self.host.snapshot()}
        for session_id, opened in list(self._opened.items()):
            view = views.get(session_id)
            if view is None or view.ended or view.blocks_done > 0:
                del self._opened[session_id]
                if view is not None and view.blocks_done > 0:
                    self.metrics.time_to_first_frame.observe(time.monotonic() - opened)
        for key, posted in list(self._posted.items()):
            view = views.get(key[0])
            known = view is not None and key[1] < len(view.prompt_blocks)
            block = view.prompt_blocks[key[1]] if known else -1
            if block is None:
                continue  # not applied yet
            if block >= 0 and view.blocks_done <= block:
                continue  # applied, its first block not made yet
            del self._posted[key]
            if block >= 0:  # -1: superseded by a later prompt before any block, or the session is gone
                self.metrics.prompt_switch.observe(max(0.0, time.time() - posted))

    def _record_metrics(self) -> None:
        """Gauges, counters and the session FPS histogram (Ray's Counter takes only positive steps)."""
        m, now, live = self.metrics, time.monotonic(), self._live_sessions()
        fps = self._rates.rate("replica", self.host.frames_made, now)
        if fps is not None:
            m.replica_fps.set(fps)
            if self._rates.delta > 0:
                m.frames.inc(self._rates.delta)
        stalled = self.host.stalled_blocks - self._stalled_reported
        if stalled > 0:
            m.stalled_blocks.inc(stalled)
            self._stalled_reported += stalled
        remade = self.host.remade_blocks - self._remade_reported
        if remade > 0:
            m.remade_blocks.inc(remade)
            self._remade_reported += remade
        m.recompiles.set(self.host.recompiles)
        if now - self._rates.last_session_sample >= SESSION_FPS_PERIOD_S:
            self._rates.last_session_sample = now
            for v in live:
                rate = self._rates.rate(v.session_id, v.frames_done, now)
                if rate is not None and v.phase is SessionPhase.LIVE:
                    m.session_fps.observe(rate)
            self._rates.keep({"replica", *(v.session_id for v in live)})
        m.sessions_live.set(len(live))
        m.jobs_running.set(int(self.jobs is not None and self.jobs.running is not None))
        self._replica_fps = fps or 0.0

    def _publish_info(self) -> None:
        """The replica's admin info and the queue depth (Redis: its errors go to the caller)."""
        live = self._live_sessions()
        self.jobs_queued = self.events.jobs_queued()
        self._guarded(lambda: self.metrics.jobs_queued.set(self.jobs_queued), self._metrics_bug)
        running = self.jobs.running if self.jobs is not None else None
        self.events.publish_info(
            {
                "replica": self.replica_id,
                "load": self.host.load,
                "capacity": self.host.max_sessions,
                "sessions": sorted(v.session_id for v in live),
                "job": running.job_id if running is not None else None,
                "jobs_queued": self.jobs_queued,
                "fps": round(self._replica_fps, 2),
                "redis": self.redis_ok,
                "updated_at": time.time(),
            }
        )

    def _job_finished(self, job_id: str, state: str, seconds: float) -> None:
        """Called on the job worker's thread: metrics must not raise into it."""
        self._guarded(lambda: self._count_job(state, seconds), self._job_metrics_bug)
        self.log.info("job %s after %.1f s", state, seconds, extra={"job_id": job_id})

    def _count_job(self, state: str, seconds: float) -> None:
        self.metrics.job_duration.observe(seconds, tags={"state": state})
        if state == "failed":
            self.metrics.error("jobs", "job_failed")


def _posted_at(event: dict) -> float:
    """When the ingress logged a prompt event (wall time); now if it did not say."""
    try:
        return float(event.get("posted_at", ""))
    except ValueError:
        return time.time()


class RateSampler:
    """Per key: the rate of a growing count between two samples."""

    def __init__(self):
        self.last: dict[str, tuple[float, float]] = {}  # key -> (count, time)
        self.delta = 0.0
        self.last_session_sample = 0.0

    def rate(self, key: str, count: float, now: float) -> float | None:
        previous = self.last.get(key)
        self.last[key] = (count, now)
        if previous is None or now <= previous[1]:
            self.delta = 0.0
            return None
        self.delta = max(0.0, count - previous[0])
        return self.delta / (now - previous[1])

    def keep(self, keys: set[str]) -> None:
        for key in set(self.last) - keys:
            del self.last[key]


def build_job_worker(config: ServiceConfig, host: StreamingRuntime, replica_id: str):
    from jobs.worker import JobWorker

    worker = JobWorker(
        host,
        config.job_queue(),
        config.video_store(),
        replica_id,
        spool_dir=config.spool_dir,
        retry_s=config.upload_retry_s,
        retry_max_s=config.upload_retry_max_s,
        callbacks=config.callbacks,
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
        # A dead replica is noticed within a second (the check is a few attribute reads): with one replica,
        # its replacement starts that much sooner (bench/results/failover_*_cpu.md).
        health_check_period_s=1,
        request_router_config=RequestRouterConfig(
            request_router_class=SessionRouter, request_router_kwargs={"redis_url": config.redis_url}
        ),
    )
