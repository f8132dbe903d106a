"""Job workers: take a job when the host has a free slot, generate it unpaced on the LiveHost (beside
any live sessions, which set the pace while they run), stream-encode fMP4 into a multipart upload, and
acknowledge only once the object is complete.

    python -m jobs.worker --redis redis://127.0.0.1:6379/0 --bucket videos   # a standalone worker
"""

from __future__ import annotations

import argparse
import logging
import threading
import time

from longlive_core.fmp4 import FragmentedMp4Encoder
from longlive_core.live import LiveHost
from longlive_core.schedule import blocks_for_seconds, switch_block, video_frames

from .queue import Claimed, JobQueue
from .storage import LocalStore, S3Store

logger = logging.getLogger("longlive.jobs")
Store = LocalStore | S3Store


def video_key(job_id: str) -> str:
    return f"videos/{job_id}.mp4"


def frames_total(seconds: float, block_frames: int = 3) -> int:
    return video_frames(blocks_for_seconds(seconds, block_frames) * block_frames)


class Cancelled(Exception):
    pass


class Preempted(Exception):
    """A live session needs the job's slot: the job goes back to the queue."""


def run_job(
    host: LiveHost,
    queue: JobQueue,
    store: Store,
    claimed: Claimed,
    consumer: str,
    preempt: threading.Event | None = None,
) -> str:
    """Generate one claimed job to its object; returns the final state (done / cancelled / preempted)."""
    request = claimed.request
    block_frames = host.config.block_frames
    switches = {switch_block(e.at, block_frames): e.prompt for e in request.schedule}  # later entries win
    session_id = f"job-{claimed.job_id}-{claimed.attempt}"
    key = video_key(claimed.job_id)
    store.abort_stale(key)
    host.open(
        session_id,
        switches.pop(0),
        seed=request.seed,
        max_seconds=request.seconds,
        scheduled=switches,
        paced=False,
    )
    upload = store.upload(key)
    encoder = FragmentedMp4Encoder(host.width, host.height)
    frames, started = 0, time.monotonic()
    try:
        while (chunk := host.next_chunk(session_id, timeout=600)) is not None:
            upload.write(encoder.encode_block(chunk.frames))
            frames += len(chunk.frames)
            if not queue.heartbeat(claimed, consumer, frames, frames / (time.monotonic() - started)):
                raise Cancelled
            if preempt is not None and preempt.is_set():
                raise Preempted
        if host.status(session_id)["state"] == "error":
            raise RuntimeError(host.status(session_id)["error"])
        upload.complete()
    except Cancelled:
        host.close(session_id)
        upload.abort()
        queue.finish(claimed.job_id, claimed.entry_id, "cancelled")
        return "cancelled"
    except Preempted:
        host.close(session_id)
        upload.abort()
        queue.release(claimed)
        return "preempted"
    except BaseException:
        host.close(session_id)
        upload.abort()
        raise
    queue.finish(claimed.job_id, claimed.entry_id, "done", key=key)
    return "done"


def notify(claimed: Claimed, state: str) -> None:
    """POST {job_id, state} to the job's callback URL, if any; a failing callback never fails the job."""
    url = claimed.request.callback_url
    if url is None:
        return
    import httpx

    try:
        httpx.post(str(url), json={"job_id": claimed.job_id, "state": state}, timeout=10).raise_for_status()
    except httpx.HTTPError as err:
        logger.warning("job %s: callback %s failed: %s", claimed.job_id, url, err)


class JobWorker:
    """Claims jobs while the host has room beyond `reserve` slots kept free for live sessions."""

    def __init__(
        self,
        host: LiveHost,
        queue: JobQueue,
        store: Store,
        consumer: str,
        reserve: int = 0,
        drive_engine: bool = False,
    ):
        self.host, self.queue, self.store = host, queue, store
        self.consumer, self.reserve = consumer, reserve
        self.stop = threading.Event()
        self.preempt = threading.Event()  # set by a live session that needs the slot
        self.running: Claimed | None = None
        self.drive_engine = drive_engine  # standalone: no replica loop steps the host, so this does

    def start(self) -> list[threading.Thread]:
        threads = [threading.Thread(target=self._claim_loop, name="jobs", daemon=True)]
        if self.drive_engine:
            threads.append(threading.Thread(target=self._engine_loop, name="engine", daemon=True))
        for thread in threads:
            thread.start()
        return threads

    def _engine_loop(self) -> None:
        while not self.stop.is_set():
            self.host.run_once()

    def _claim_loop(self) -> None:
        while not self.stop.is_set():
            if self.preempt.is_set() or self.host.load >= self.host.max_sessions - self.reserve:
                time.sleep(0.1)
                continue
            try:
                claimed = self.queue.claim(self.consumer, block_ms=200)
            except Exception:  # noqa: BLE001 - e.g. Redis away: keep the worker, try again
                logger.exception("claiming a job failed")
                time.sleep(1)
                continue
            if claimed is None:
                continue
            self.running = claimed
            try:
                state = run_job(self.host, self.queue, self.store, claimed, self.consumer, self.preempt)
                logger.info("job %s: %s", claimed.job_id, state)
                if state != "preempted":
                    notify(claimed, state)
            except Exception as err:  # noqa: BLE001 - any failure is recorded and retried or dead-lettered
                logger.exception("job %s failed", claimed.job_id)
                self.queue.fail(claimed, f"{type(err).__name__}: {err}")
            finally:
                self.running = None


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
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    pipe = LongLivePipeline.from_pretrained(args.model)
    host = LiveHost(pipe, max_sessions=1, size=tuple(args.size) if args.size else None)
    store = S3Store(args.bucket, args.endpoint_url) if args.bucket else LocalStore(args.local_dir)
    queue = JobQueue(args.redis, stale_after_s=args.stale_after)
    worker = JobWorker(host, queue, store, args.consumer, drive_engine=True)
    for thread in worker.start():
        thread.join()


if __name__ == "__main__":
    main()
