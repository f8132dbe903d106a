"""The service's one config object (serve_config.yaml `args`, or `longlive serve` flags)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from jobs.callbacks import CallbackPolicy

from .inbound import InboundLimits

FORWARDED_ALLOW_IPS = "FORWARDED_ALLOW_IPS"  # uvicorn's env: the peers whose X-Forwarded-For it believes


class ServiceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelled setting is an error, not a default

    model: str = "tiny-random"
    device: str | None = Field(None, description="cuda / cpu; default: cuda when available")
    size: tuple[int, int] | None = Field(None, description="(width, height); default: the model's")
    compile: bool = False
    low_memory: bool = False
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_timeout_s: float = Field(
        0.5, gt=0, description="the ingress's Redis calls: connect and reply timeout (then 503)"
    )
    num_replicas: int = Field(1, ge=1)
    max_sessions: int = Field(2, ge=1, description="sessions per replica: the replica's capacity")
    replica_gpus: float = Field(0, ge=0, description="1 on GPU machines")
    replica_cpus: float = Field(0.25, ge=0)
    lead_seconds: float = Field(1.5, gt=0, description="how far generation may run ahead of playback")
    send_lead_seconds: float | None = Field(
        0.5,
        ge=0,
        description="blocks are sent this far ahead of playback; a new prompt remakes the unsent ones"
        " (instant steering); null: sent as made, a prompt applies after them",
    )
    buffer_blocks: int = Field(16, ge=1, description="blocks buffered per session before old ones drop")
    idle_timeout_s: float = Field(60, gt=0, description="a session nobody reads for this long ends")
    max_streams_per_session: int = Field(2, ge=1, description="open streams of one session; more get 429")
    websocket_inbound: InboundLimits = Field(
        default_factory=InboundLimits,
        description="what a client may send on the video WebSocket (the proxy: deployments/inbound.py)",
    )
    playback_speed: float = Field(1.0, ge=0, description="pacing: 1 = real time, 0 = unpaced")
    graceful_shutdown_timeout_s: float = Field(300, ge=0, description="drain time; above the longest session")
    retry_after_s: int = Field(5, ge=1, description="Retry-After on 503 when every replica is full")
    jobs: bool = Field(True, description="replicas also take batch jobs from the Redis queue")
    s3_bucket: str | None = Field(None, description="finished videos go here; None: store_dir")
    s3_endpoint_url: str | None = Field(None, description="an S3-compatible endpoint; None: AWS")
    store_dir: str = Field("videos", description="local-directory store (the embedded default)")
    job_stale_after_s: float = Field(60, gt=0, description="a job silent this long is redone elsewhere")
    job_max_attempts: int = Field(3, ge=1)
    warm_up_sessions: int | None = Field(
        None, ge=1, description="batch sizes the warm-up compiles, 1..this; None: up to max_sessions"
    )
    realtime_admission: bool = Field(
        True, description="admit a live session only while the measured step time keeps all real time"
    )
    max_prompt_chars: int = Field(2000, ge=1, le=2000, description="longer prompts get 422 (hard cap 2000)")
    max_session_seconds: float = Field(3600, gt=0, le=3600, description="a session's max_seconds bound")
    max_job_seconds: float = Field(3600, gt=0, le=3600, description="a job's seconds bound")
    max_schedule_entries: int = Field(500, ge=1, le=500, description="prompt changes per job")
    checkpoint_ttl_s: int = Field(
        3600, ge=60, description="a session's checkpoint outlives its last block so long"
    )
    failover_timeout_s: float = Field(
        60, gt=0, description="how long a request waits for a moved session's new replica before it fails"
    )
    spool_dir: str | None = Field(
        None, description="videos wait here until uploaded; None: <tmp>/longlive-spool (keep it on restarts)"
    )
    upload_retry_s: float = Field(1.0, gt=0, description="first wait after a failed upload; then doubled")
    upload_retry_max_s: float = Field(60.0, gt=0, description="the longest wait between upload tries")
    callbacks: CallbackPolicy = Field(
        default_factory=CallbackPolicy,
        description="job callbacks: `allow` (non-public targets), `deadline_s` (10), `workers`, `backlog`",
    )
    # Security and limits (deployments/security.py; deployments/README.md "Security and limits").
    api_keys: list[str] = Field(
        default_factory=list,
        description="service-wide keys for the X-API-Key header, plain or 'sha256:<hex digest>'; empty: "
        "the env LONGLIVE_API_KEYS (comma separated), else no key needed",
    )
    max_body_bytes: int = Field(64 * 1024, ge=1024, description="larger request bodies get 413")
    rate_limit_per_minute: int = Field(600, ge=0, description="requests per client per minute; 0: off")
    trust_forwarded_for: bool = Field(
        False,
        description="key the rate limit and quotas by X-Forwarded-For's first entry (behind a proxy you "
        "run); the Ray proxy's FORWARDED_ALLOW_IPS must match (forwarded_allow_ips)",
    )
    # Quotas per client (its API key when keys are configured, else its address) and of the whole queue.
    max_sessions_per_client: int = Field(2, ge=1, description="open sessions of one client; more get 429")
    max_queued_jobs_per_client: int = Field(10, ge=1, description="queued jobs of one client; more get 429")
    max_queued_jobs: int = Field(1000, ge=1, description="jobs waiting for a worker; more get 503")

    @model_validator(mode="after")
    def _send_within_lead(self) -> ServiceConfig:
        if self.send_lead_seconds is not None and self.send_lead_seconds > self.lead_seconds:
            raise ValueError(
                f"send_lead_seconds ({self.send_lead_seconds}) must not exceed"
                f" lead_seconds ({self.lead_seconds})"
            )
        return self

    @property
    def forwarded_allow_ips(self) -> str:
        """What uvicorn in Ray's proxy must be started with (env FORWARDED_ALLOW_IPS): it rewrites the
        peer's address from X-Forwarded-For for these peers, before the guard sees it."""
        return "*" if self.trust_forwarded_for else ""

    def limit_errors(self, prompts: list[str], seconds: float | None, kind: str = "session") -> list[dict]:
        """A body against the operator's limits (tighter than the schemas' hard caps): errors in the
        shape of a 422's detail (loc + msg), empty when within them. kind: 'session' or 'job'."""
        errors = []
        if any(len(prompt) > self.max_prompt_chars for prompt in prompts):
            errors.append({"loc": ["body", "prompt"], "msg": f"at most {self.max_prompt_chars} characters"})
        field, cap = (
            ("seconds", self.max_job_seconds) if kind == "job" else ("max_seconds", self.max_session_seconds)
        )
        if seconds is not None and seconds > cap:
            errors.append({"loc": ["body", field], "msg": f"at most {cap:g} s"})
        if kind == "job" and len(prompts) > self.max_schedule_entries:
            errors.append(
                {"loc": ["body", "schedule"], "msg": f"at most {self.max_schedule_entries} entries"}
            )
        return errors

    def job_queue(self, timeout_s: float = 15.0):
        """The job queue; the ingress passes its redis_timeout_s (a worker may wait longer)."""
        from jobs.queue import JobQueue, QueueLimits

        return JobQueue(
            self.redis_url,
            self.job_max_attempts,
            self.job_stale_after_s,
            timeout_s,
            QueueLimits(self.max_queued_jobs, self.max_queued_jobs_per_client),
        )

    def video_store(self):
        from jobs.storage import LocalStore, S3Store

        return S3Store(self.s3_bucket, self.s3_endpoint_url) if self.s3_bucket else LocalStore(self.store_dir)
