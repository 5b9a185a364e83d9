"""One typed settings object, read from CHATJOBS_* environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Everything chatjobs reads from its environment (prefix ``CHATJOBS_``)."""

    model_config = SettingsConfigDict(env_prefix="CHATJOBS_", extra="ignore")

    database_url: str = "postgresql://postgres@localhost:5432/chatjobs"
    redis_url: str = "redis://localhost:6379/0"

    upstream_base_url: str = "http://127.0.0.1:8100/v1"
    upstream_api_key: SecretStr = SecretStr("")
    upstream_connect_timeout: float = Field(10.0, gt=0)
    upstream_read_timeout: float = Field(600.0, gt=0)
    default_model: str = "gpt-4.1"
    # Per-model routing (TOML); models it does not list use the upstream_* values here.
    models_file: Path | None = None
    upstream_rpm: int | None = Field(None, ge=1)
    upstream_tpm: int | None = Field(None, ge=1)
    upstream_max_concurrency: int | None = Field(None, ge=1)
    limiter_headroom: float = Field(0.98, gt=0, le=1)
    limiter_max_wait_seconds: float = Field(2.0, ge=0)
    default_output_budget: int = Field(1024, ge=1)
    chunk_overlap_tokens: int = Field(100, ge=0)

    # json, text, or auto: text on a terminal, json anywhere else (chatjobs.logs).
    log_format: Literal["auto", "json", "text"] = "auto"
    # GET /metrics: tenants (names or ids, comma-separated) given a `tenant` label of their
    # own, the rest counted as `other`; and a bearer token it asks for, when set.
    metrics_tenants: str = ""
    metrics_token: SecretStr = SecretStr("")

    worker_pool: str = "threads"
    worker_concurrency: int = Field(64, ge=1)
    queue_name: str = "chatjobs"

    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    auth_cache_seconds: float = Field(30.0, ge=0)
    # A body over large_body_bytes costs ~6x its size to parse and store: at most
    # max_large_bodies of them are read at once per API process; others wait up to
    # large_body_wait_seconds (unread, in the socket), then get a 503 with Retry-After.
    large_body_bytes: int = Field(1024 * 1024, ge=1024)
    max_large_bodies: int = Field(4, ge=1)
    large_body_wait_seconds: float = Field(10.0, ge=0)

    # Per-tenant limits: the defaults for tenants without their own (`chatjobs tenants set`);
    # 0 means no limit. Submissions per second on POST /v1/jobs, with a burst of one
    # second's worth; queued or retrying jobs; open event streams; map steps of one job.
    tenant_submit_rps: int = Field(200, ge=0)
    tenant_max_queued: int = Field(100_000, ge=0)
    tenant_max_streams: int = Field(100, ge=0)
    tenant_max_calls_per_job: int = Field(100, ge=0)

    # Webhooks: CIDRs a receiver may resolve to despite being private (development, tests).
    webhook_allow_private: str = ""
    webhook_timeout_seconds: float = Field(15.0, gt=0)
    # Seconds before each attempt (Svix-like): immediately, 5 s, 5 min, 30 min, 2 h, 5 h,
    # 10 h, 10 h.
    webhook_retry_schedule: str = "0,5,300,1800,7200,18000,36000,36000"
    lease_seconds: float = Field(60.0, gt=0)
    heartbeat_seconds: float | None = Field(None, gt=0)
    reconcile_interval_seconds: float = Field(5.0, gt=0)
    # How often beat's schedule ticker looks for due firings (chatjobs.schedules.service).
    schedule_tick_seconds: float = Field(1.0, gt=0)
    # Offloading to provider batch APIs (chatjobs.offload): how often beat gathers eligible
    # jobs, and the first and longest wait between two polls of an upstream batch.
    offload_gather_seconds: float = Field(5.0, gt=0)
    offload_poll_seconds: float = Field(30.0, gt=0)
    offload_poll_max_seconds: float = Field(600.0, gt=0)
    stale_queued_seconds: float = Field(300.0, gt=0)
    worker_shutdown_seconds: float = Field(30.0, ge=0)
    max_attempts: int = Field(6, ge=1)
    retry_base_seconds: float = Field(1.0, gt=0)
    retry_cap_seconds: float = Field(300.0, gt=0)
    retry_after_cap_seconds: float = Field(600.0, gt=0)
    # Dispatch (chatjobs.jobs.dispatch): jobs wait in Postgres and the dispatcher admits the
    # next ones as workers free up. A submission or a finished job wakes it at once; this is
    # only how often it looks when nothing woke it (retries and deferrals falling due).
    dispatch_interval_seconds: float = Field(0.25, gt=0)
    # Messages waiting in the broker at once: 0 sizes it to the worker slots that are alive
    # (each worker registers its pool); a later job waits behind at most this many.
    dispatch_window: int = Field(0, ge=0)
    # For a rate-limited model, admit about this much of its rate ahead of the calls.
    dispatch_lookahead_seconds: float = Field(1.0, gt=0)
    # Per-tenant dispatch defaults (`chatjobs tenants set --weight --max-inflight`): the
    # weight in fair share, and jobs admitted or running at once (0: no cap).
    tenant_weight: int = Field(1, ge=1)
    tenant_max_inflight: int = Field(0, ge=0)
    job_deadline_seconds: float = Field(24 * 3600.0, gt=0)
    db_pool_size: int = Field(16, ge=1)
    # Finished jobs (with their steps, calls and webhook deliveries) are deleted after this.
    retention_days: float = Field(30.0, gt=0)

    # Files (OpenAI Files API): uploads go to Postgres large objects ("postgres": one
    # database to back up, readable from every host) or to files under files_dir
    # ("directory": for uploads too large to want in the database; share the directory
    # between API and worker hosts).
    file_storage: str = "postgres"
    files_dir: Path = Path(".run/files")
    max_upload_bytes: int = Field(200 * 1024 * 1024, ge=1024)
    file_expiry_seconds: int = Field(30 * 86400, ge=3600)
    # Batches: lines per input file (they wait like any job, at the batch class's priority).
    batch_max_lines: int = Field(50_000, ge=1)
    batch_output_expiry_seconds: int = Field(30 * 86400, ge=3600)

    @field_validator("file_storage")
    @classmethod
    def _known_storage(cls, value: str) -> str:
        if value not in {"postgres", "directory"}:
            raise ValueError("CHATJOBS_FILE_STORAGE must be postgres or directory")
        return value

    @field_validator("database_url")
    @classmethod
    def _use_psycopg3(cls, value: str) -> str:
        # SQLAlchemy reads a bare postgresql:// as psycopg2, which we do not ship.
        for prefix in ("postgresql://", "postgres://"):
            if value.startswith(prefix):
                return "postgresql+psycopg://" + value[len(prefix) :]
        if not value.startswith("postgresql+psycopg://"):
            raise ValueError("CHATJOBS_DATABASE_URL must be a postgresql:// URL")
        return value

    @field_validator("worker_pool")
    @classmethod
    def _known_pool(cls, value: str) -> str:
        if value not in {"threads", "prefork", "solo"}:
            raise ValueError("CHATJOBS_WORKER_POOL must be one of threads, prefork, solo")
        return value

    @property
    def heartbeat_interval(self) -> float:
        """How often a worker renews its leases: a third of the lease unless set."""
        return self.heartbeat_seconds or self.lease_seconds / 3


@lru_cache
def get_settings() -> Settings:
    """The process's settings, built once; tests clear the cache to override."""
    return Settings()
