"""The service's Prometheus metrics (`ray.serve.metrics`; Serve adds the deployment, replica and
application tags) and its structured logs. Exported by each Ray node's metrics agent as `ray_<name>`
(port 8080 on KubeRay pods; `_metrics_export_port` of `ray.init`); the Grafana dashboard is
k8s/monitoring/grafana-dashboard.json.

| metric | kind | what |
|---|---|---|
| longlive_frames_total | counter | video frames made by the replica (rate(): FPS) |
| longlive_replica_fps | gauge | the replica's frames per second over the last few seconds |
| longlive_session_fps | histogram | each live session's frames per second, sampled every 2 s |
| longlive_sessions_live | gauge | live sessions on the replica (batch jobs apart) |
| longlive_session_capacity | gauge | the replica's session slots (max_sessions) |
| longlive_jobs_running | gauge | batch jobs running on the replica (0 or 1) |
| longlive_jobs_queued | gauge | jobs waiting in the queue (the same on every replica: take max) |
| longlive_time_to_first_frame_seconds | histogram | session opened -> its first block out of the replica |
| longlive_prompt_switch_seconds | histogram | prompt posted -> first block made under it |
| longlive_job_duration_seconds | histogram | claim -> end of a job, tag state |
| longlive_errors_total | counter | tags where (ingress / generator / jobs) and kind |
"""

from __future__ import annotations

import logging
from functools import cache

SECONDS = [0.05, 0.1, 0.25, 0.5, 1, 1.5, 2, 3, 5, 10, 30]
JOB_SECONDS = [5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200]
FPS_BUCKETS = [1, 4, 8, 12, 14, 16, 20, 24, 32, 48, 64]


class Metrics:
    """Every metric of the service, made once per process (inside a replica, so Serve's tags apply)."""

    def __init__(self):
        from ray.serve.metrics import Counter, Gauge, Histogram

        self.frames = Counter("longlive_frames_total", "video frames made by the replica")
        self.replica_fps = Gauge("longlive_replica_fps", "frames per second made by the replica")
        self.session_fps = Histogram(
            "longlive_session_fps", "frames per second of each live session", boundaries=FPS_BUCKETS
        )
        self.sessions_live = Gauge("longlive_sessions_live", "live sessions on the replica")
        self.capacity = Gauge("longlive_session_capacity", "session slots of the replica")
        self.jobs_running = Gauge("longlive_jobs_running", "batch jobs running on the replica")
        self.jobs_queued = Gauge("longlive_jobs_queued", "jobs waiting in the queue")
        self.time_to_first_frame = Histogram(
            "longlive_time_to_first_frame_seconds", "session opened -> first block out", boundaries=SECONDS
        )
        self.prompt_switch = Histogram(
            "longlive_prompt_switch_seconds", "prompt posted -> first block under it", boundaries=SECONDS
        )
        self.job_duration = Histogram(
            "longlive_job_duration_seconds", "a job's claim -> end", JOB_SECONDS, tag_keys=("state",)
        )
        self.errors = Counter("longlive_errors_total", "errors", tag_keys=("where", "kind"))
        self.stalled_blocks = Counter(
            "longlive_stalled_blocks_total", "live blocks delivered after their first frame was due on screen"
        )
        self.remade_blocks = Counter(
            "longlive_remade_blocks_total", "live blocks thrown away unsent and made again under a new prompt"
        )
        self.recompiles = Gauge(
            "longlive_recompiles_after_ready", "graphs torch.compile made after the warm-up (0 is healthy)"
        )

    def error(self, where: str, kind: str) -> None:
        self.errors.inc(tags={"where": where, "kind": kind})


@cache
def metrics() -> Metrics:
    return Metrics()


class ContextLog(logging.LoggerAdapter):
    """Log records with ids (session_id, job_id, replica) as `extra` fields, and in their text. The
    logger is a child of `ray.serve`, so in a replica the records go through Serve's handlers: its
    replica log files, as JSON with the ids as keys under `logging_config: {encoding: JSON}`."""

    def process(self, msg, kwargs):
        fields = {**self.extra, **kwargs.pop("extra", {})}
        kwargs["extra"] = fields
        ids = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
        return (f"[{ids}] {msg}" if ids else msg), kwargs


def log(name: str, **ids) -> ContextLog:
    """`log("longlive.generator", replica=rid).warning("...", extra={"session_id": sid})`"""
    return ContextLog(logging.getLogger(f"ray.serve.{name}"), ids)
