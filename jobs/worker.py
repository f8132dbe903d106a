"""Job workers: take a job when the host has a free slot, generate it unpaced on the StreamingRuntime (beside
any live sessions, which set the pace while they run), encode fMP4 block by block into a local spool
file, upload that file to the store, and acknowledge only once the object is complete.

Outages don't lose a job. While S3 (or the local store's disk) is away the job shows "uploading": the
worker retries with capped, jittered exponential backoff for as long as it takes, heartbeating all the
while so no other worker takes the job over; the spool file goes only once the object is complete. While
Redis is away a running job generates on: a failed heartbeat is retried later, and the final state is
written once Redis answers again. A worker restarted on the same machine (same spool directory) that
gets a job whose spool file is complete uploads it instead of generating it again.

    python -m jobs.worker --redis redis://127.0.0.1:6379/0 --bucket videos   # a standalone worker
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from longlive_core.fmp4 import FragmentedMp4Encoder
from longlive_core.live import StreamingRuntime
from longlive_core.schedule import frames_total, switch_block

from .callbacks import CallbackPolicy, Callbacks
from .queue import ENDED, UNREACHABLE, Claimed, JobQueue
from .repeats import Repeats
from .storage import LocalStore, S3Store, Stopped, transient

logger = logging.getLogger("longlive.jobs")
Store = LocalStore | S3Store
T = TypeVar("T")


def video_key(job_id: str) -> str:
    return f"videos/{job_id}.mp4"


def default_spool_dir() -> Path:
    return Path(tempfile.gettempdir()) / "longlive-spool"


def spool_path(spool_dir: Path, job_id: str) -> Path:
    """A job's complete video; `<that>.partial` while it is being generated."""
    return spool_dir / f"{job_id}.mp4"


class Cancelled(Exception):
    pass


class Preempted(Exception):
    """A live session needs the job's slot: the job goes back to the queue."""


@dataclass(frozen=True)
class Backoff:
    """Waits between tries: `first_s`, doubled after each failure up to `max_s`, each shortened by a
    random fraction of up to `jitter` (so workers that failed together do not retry together)."""

    first_s: float = 1.0
    max_s: float = 60.0
    jitter: float = 0.5

    def delays(self) -> Iterator[float]:
        delay = min(self.first_s, self.max_s)
        while True:
            yield delay * (1 - self.jitter * random.random())
            delay = min(2 * delay, self.max_s)


def until_redis_answers(call: Callable[[], T], backoff: Backoff, what: str, stop: threading.Event) -> T:
    """`call()` (a Redis write), retried while Redis is unreachable; raises once `stop` is set."""
    unreachable = Repeats(logger, f"{what}: Redis unreachable, retrying")
    for delay in backoff.delays():
        try:
            result = call()
        except UNREACHABLE as err:
            if stop.is_set():
                raise
            unreachable.failed(err)
            stop.wait(delay)
        else:
            unreachable.ok()
            return result
    raise AssertionError("unreachable")


class Heartbeat:
    """Renews the job's claim, publishes progress and learns of a cancel. A beat that fails because
    Redis is away is logged and skipped; beats resume after a backoff (at most a quarter of the stale
    time, so the claim is renewed soon after Redis returns) and the job goes on meanwhile."""

    def __init__(self, queue: JobQueue, claimed: Claimed, consumer: str, backoff: Backoff):
        self.queue, self.claimed, self.consumer = queue, claimed, consumer
        self.backoff = Backoff(
            backoff.first_s, min(backoff.max_s, queue.stale_after_ms / 4000), backoff.jitter
        )
        self.cancelled = False
        self._delays: Iterator[float] | None = None  # set while Redis is away
        self._next_try = 0.0

    def __call__(self, frames_done: int, fps: float | None = None, state: str | None = None) -> bool:
        """One beat (unless Redis was away and its backoff is still running); True if cancelled."""
        now = time.monotonic()
        if now < self._next_try:
            return self.cancelled
        try:
            self.cancelled = not self.queue.heartbeat(self.claimed, self.consumer, frames_done, fps, state)
        except UNREACHABLE as err:
            if self._delays is None:
                logger.warning(
                    "job %s: heartbeat failed at frame %d, Redis unreachable (%s); going on",
                    self.job_id,
                    frames_done,
                    err,
                )
                self._delays = self.backoff.delays()
            self._next_try = now + next(self._delays)
        else:
            if self._delays is not None:
                logger.info("job %s: heartbeat back at frame %d", self.job_id, frames_done)
            self._delays, self._next_try = None, 0.0
        return self.cancelled

    @property
    def job_id(self) -> str:
        return self.claimed.job_id


def run_job(
    host: StreamingRuntime,
    queue: JobQueue,
    store: Store,
    claimed: Claimed,
    consumer: str,
    preempt: threading.Event | None = None,
    spool_dir: str | Path | None = None,
    backoff: Backoff = Backoff(),  # noqa: B008 - frozen
    stop: threading.Event | None = None,
) -> str:
    """Generate one claimed job into its spool file and upload that to its object; returns the final
    state: done / cancelled / preempted, or stopped (`stop` set while uploading: the job is released,
    its spool file kept for a restarted worker)."""
    stop = stop or threading.Event()
    spool = spool_path(Path(spool_dir) if spool_dir else default_spool_dir(), claimed.job_id)
    beat = Heartbeat(queue, claimed, consumer, backoff)
    total = frames_total(claimed.request.seconds, host.config.block_frames)
    try:
        if spool.is_file():
            logger.info("job %s: its video is spooled already (%s); uploading it", claimed.job_id, spool)
        else:
            total = generate(host, claimed, spool, beat, preempt)
    except Cancelled:
        until_redis_answers(
            lambda: queue.finish(claimed.job_id, claimed.entry_id, "cancelled"),
            backoff,
            f"job {claimed.job_id}",
            stop,
        )
        return "cancelled"
    except Preempted:
        until_redis_answers(lambda: queue.release(claimed), backoff, f"job {claimed.job_id}", stop)
        return "preempted"
    return upload(queue, store, claimed, spool, beat, total, backoff, stop)


def generate(
    host: StreamingRuntime,
    claimed: Claimed,
    spool: Path,
    beat: Heartbeat,
    preempt: threading.Event | None,
) -> int:
    """Run the schedule on the host into `spool` (written as `.partial`, renamed once complete and
    synced); returns the frames made. Raises Cancelled / Preempted, leaving no spool file."""
    request = claimed.request
    switches = {switch_block(e.at, host.config.block_frames): e.prompt for e in request.schedule}  # later win
    session_id = f"job-{claimed.job_id}-{claimed.attempt}"
    partial = spool.with_name(spool.name + ".partial")
    spool.parent.mkdir(parents=True, exist_ok=True)
    host.open(
        session_id,
        switches.pop(0),
        seed=request.seed,
        max_seconds=request.seconds,
        scheduled=switches,
        paced=False,
    )
    encoder = FragmentedMp4Encoder(host.width, host.height)
    frames, started = 0, time.monotonic()
    try:
        with open(partial, "wb") as file:
            while (chunk := host.next_chunk(session_id, timeout=600)) is not None:
                file.write(encoder.encode_block(chunk.frames))
                frames += len(chunk.frames)
                if beat(frames, frames / (time.monotonic() - started)):
                    raise Cancelled
                if preempt is not None and preempt.is_set():
                    raise Preempted
            if host.status(session_id)["state"] == "error":
                raise RuntimeError(host.status(session_id)["error"])
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, spool)
    except BaseException:
        host.close(session_id)
        partial.unlink(missing_ok=True)
        raise
    return frames


def upload(
    queue: JobQueue,
    store: Store,
    claimed: Claimed,
    spool: Path,
    beat: Heartbeat,
    frames: int,
    backoff: Backoff,
    stop: threading.Event,
) -> str:
    """Upload the spool file, retrying while the store is away; a thread heartbeats meanwhile (a part
    or a retry wait can outlast the stale time) with state "uploading" and watches for cancel / stop."""
    job = f"job {claimed.job_id}"
    key = video_key(claimed.job_id)
    sending = store.upload(key, spool)
    halt, sent = threading.Event(), threading.Event()
    every_s = min(1.0, queue.stale_after_ms / 4000)

    def keep_claim() -> None:
        while not sent.is_set():
            if beat(frames, state="uploading") or stop.is_set():
                halt.set()
            sent.wait(every_s)

    keeper = threading.Thread(target=keep_claim, name=f"beat-{claimed.job_id}", daemon=True)
    keeper.start()
    complete = False
    try:
        delays = backoff.delays()
        while not halt.is_set():
            try:
                sending.send(stop=halt.is_set)
                complete = True
                break
            except Stopped:
                break
            except Exception as err:
                if not transient(err):
                    raise  # e.g. no such bucket: the job fails (and is retried from its spool file)
                delay = next(delays)
                logger.warning(
                    "%s: upload failed (%s: %s); trying again in %.1f s", job, type(err).__name__, err, delay
                )
                halt.wait(delay)
    finally:
        sent.set()
        keeper.join()
    if not complete and beat.cancelled:
        try:
            sending.abort()
        except Exception as err:  # noqa: BLE001 - S3 away: a bucket lifecycle rule removes it
            logger.warning("%s: aborting the upload failed: %s", job, err)
        spool.unlink(missing_ok=True)
        until_redis_answers(
            lambda: queue.finish(claimed.job_id, claimed.entry_id, "cancelled"), backoff, job, stop
        )
        return "cancelled"
    if not complete:  # stopping: another worker (or this one restarted) takes the job over
        try:
            queue.release(claimed)
        except UNREACHABLE:
            pass  # still pending: taken over once stale
        return "stopped"
    finished = until_redis_answers(
        lambda: queue.finish(claimed.job_id, claimed.entry_id, "done", key=key), backoff, job, stop
    )
    spool.unlink(missing_ok=True)
    if not finished:  # cancelled while its last part went up: the cancel wins
        store.delete(key)
        return "cancelled"
    return "done"


def sweep_spool(queue: JobQueue, spool_dir: Path) -> None:
    """Delete spool files of jobs that have ended (or whose record expired): left by a worker that died
    or a job that failed for good. Files of jobs still queued or running stay."""
    for path in spool_dir.glob("*.mp4*"):
        record = queue.get(path.name.split(".")[0])
        if record is None or record.get("state") in ENDED:
            path.unlink(missing_ok=True)


class JobWorker:
    """Claims jobs while the host has room beyond `reserve` slots kept free for live sessions. One job at
    a time: while S3 is away the worker keeps uploading its job rather than spooling more."""

    def __init__(
        self,
        host: StreamingRuntime,
        queue: JobQueue,
        store: Store,
        consumer: str,
        reserve: int = 0,
        drive_engine: bool = False,
        spool_dir: str | Path | None = None,
        retry_s: float = 1.0,
        retry_max_s: float = 60.0,
        callbacks: CallbackPolicy | Callbacks | None = None,
    ):
        self.host, self.queue, self.store = host, queue, store
        self.consumer, self.reserve = consumer, reserve
        self.stop = threading.Event()
        self.preempt = threading.Event()  # set by a live session that needs the slot
        self.running: Claimed | None = None
        self.drive_engine = drive_engine  # standalone: no replica loop steps the host, so this does
        self.threads: list[threading.Thread] = []
        self.spool_dir = Path(spool_dir) if spool_dir else default_spool_dir()
        self.backoff = Backoff(retry_s, retry_max_s)
        # Sent on threads of their own: a slow callback server never delays the next job.
        self.callbacks = (
            callbacks if isinstance(callbacks, Callbacks) else Callbacks(callbacks or CallbackPolicy())
        )
        # Called with (job id, state, seconds since claimed) when a job leaves this worker (metrics).
        self.on_finished: Callable[[str, str, float], None] | None = None

    def start(self) -> list[threading.Thread]:
        threads = [threading.Thread(target=self._claim_loop, name="jobs", daemon=True)]
        if self.drive_engine:
            threads.append(threading.Thread(target=self._engine_loop, name="engine", daemon=True))
        for thread in threads:
            thread.start()
        self.threads = threads
        return threads

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop claiming and wait (up to `timeout` s per thread) until the threads have ended: a worker
        still waiting in XREADGROUP would otherwise take the next job submitted."""
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout)
        self.callbacks.shutdown()

    def _engine_loop(self) -> None:
        while not self.stop.is_set():
            self.host.run_once()

    def _claim_loop(self) -> None:
        next_sweep = 0.0  # leftovers of ended jobs go at start, after each job and every so often
        unreachable = Repeats(logger, "claiming jobs: Redis unreachable")
        while not self.stop.is_set():
            if self.preempt.is_set() or self.host.load >= self.host.max_sessions - self.reserve:
                time.sleep(0.1)
                continue
            try:
                if time.monotonic() >= next_sweep:
                    sweep_spool(self.queue, self.spool_dir)
                    next_sweep = time.monotonic() + max(1.0, self.queue.stale_after_ms / 1000)
                claimed = self.queue.claim(self.consumer, block_ms=200)
            except UNREACHABLE as err:  # Redis away: logged once, counted, tried again
                unreachable.failed(err)
                self.stop.wait(1)
                continue
            except Exception:  # noqa: BLE001 - a bug, not Redis: logged with its traceback, the worker kept
                logger.exception("claiming a job failed (a bug)")
                self.stop.wait(1)
                continue
            unreachable.ok()
            if claimed is None:
                continue
            if self.stop.is_set():  # stopped while waiting for a job: give it back untouched
                self.queue.release(claimed)
                break
            self.running = claimed
            started, state = time.monotonic(), "failed"
            try:
                state = run_job(
                    self.host,
                    self.queue,
                    self.store,
                    claimed,
                    self.consumer,
                    self.preempt,
                    self.spool_dir,
                    self.backoff,
                    self.stop,
                )
                logger.info("job %s: %s", claimed.job_id, state)
                if state in ("done", "cancelled") and claimed.request.callback_url is not None:
                    self.callbacks.send(claimed.job_id, str(claimed.request.callback_url), state)
            except Exception as err:  # noqa: BLE001 - any failure is recorded and retried or dead-lettered
                logger.exception("job %s failed", claimed.job_id)
                error = f"{type(err).__name__}: {err}"
                try:
                    until_redis_answers(
                        lambda c=claimed, e=error: self.queue.fail(c, e),
                        self.backoff,
                        f"job {claimed.job_id}",
                        self.stop,
                    )
                except UNREACHABLE:
                    pass  # stopping with Redis away: the entry stays pending and is retried once stale
            finally:
                self.running = None
                next_sweep = 0.0
                if self.on_finished is not None:
                    self.on_finished(claimed.job_id, state, time.monotonic() - started)


def main() -> None:
    from longlive_core import LongLivePipeline

    parser = argparse.ArgumentParser(description="a standalone job worker")
    parser.add_argument("--redis", required=True)
    parser.add_argument("--bucket", help="S3 bucket (else --local-dir)")
    parser.add_argument("--endpoint-url", default=None)
    parser.add_argument("--local-dir", default="videos")
    parser.add_argument("--consumer", default=f"worker-{time.time_ns()}")
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--size", type=int, nargs=2, default=None)
    parser.add_argument("--stale-after", type=float, default=60.0)
    parser.add_argument("--spool-dir", default=None, help="videos wait here until uploaded")
    parser.add_argument("--retry", type=float, nargs=2, default=(1.0, 60.0), metavar=("FIRST_S", "MAX_S"))
    parser.add_argument("--callback-allow", nargs="*", default=[], help="non-public callback targets allowed")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    pipe = LongLivePipeline.from_pretrained(args.model)
    host = StreamingRuntime(pipe, max_sessions=1, size=tuple(args.size) if args.size else None)
    store = S3Store(args.bucket, args.endpoint_url) if args.bucket else LocalStore(args.local_dir)
    queue = JobQueue(args.redis, stale_after_s=args.stale_after)
    worker = JobWorker(
        host,
        queue,
        store,
        args.consumer,
        drive_engine=True,
        spool_dir=args.spool_dir,
        retry_s=args.retry[0],
        retry_max_s=args.retry[1],
        callbacks=CallbackPolicy(allow=args.callback_allow),
    )
    for thread in worker.start():
        thread.join()


if __name__ == "__main__":
    main()
