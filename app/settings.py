"""Configuration from ``CONVEYOR_*`` environment variables (or a ``.env`` file)."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DATABASE_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/conveyor"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
# The built-in job types (demo.*, http.request): always loaded, whatever the setting lists.
BUILTIN_HANDLER_MODULES = ("workers.handlers",)
MAX_RETENTION_SECONDS = 100 * 366 * 86400  # longer is "forever": write 0


class Settings(BaseSettings):
    """Every knob Conveyor reads. Reach it only through :func:`get_settings`."""

    model_config = SettingsConfigDict(
        env_prefix="CONVEYOR_", env_file=".env", extra="ignore", frozen=True
    )

    database_url: str = DEFAULT_DATABASE_URL
    redis_url: str = DEFAULT_REDIS_URL
    redis_cluster: bool = False
    partitions: int = Field(default=1, ge=1, le=1024)
    redis_prefix: str = Field(default="conveyor", min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")
    api_keys: str | None = None
    handler_modules: str = ",".join(BUILTIN_HANDLER_MODULES)
    retry_base_seconds: float = Field(default=1.0, ge=0)
    retry_max_seconds: float = Field(default=300.0, ge=0)
    claim_idle_seconds: float = Field(default=30.0, gt=0)
    reconcile_seconds: float = Field(default=30.0, gt=0)
    max_payload_bytes: int = Field(default=262144, ge=1024)
    stream_maxlen: int = Field(default=100000, ge=100)
    page_max_bytes: int = Field(default=4 << 20, ge=65536)
    shutdown_grace_seconds: float = Field(default=30.0, ge=0)
    # A job with no timeout of its own, of a type with none, gets this one (0: none at all).
    default_timeout_seconds: float = Field(default=3600.0, ge=0, le=7 * 86400)
    # A job whose type a worker does not know is handed back for this long, then dead.
    unknown_type_grace_seconds: float = Field(default=600.0, ge=0)
    # A running job asked to cancel: how long its handler may clean up after the cancellation.
    cancel_grace_seconds: float = Field(default=10.0, ge=0, le=3600)
    # RetryLater deferrals a job may take without spending attempts; past it, each counts as
    # a failed attempt (so a service that always answers 429 cannot keep a job forever).
    max_deferrals: int = Field(default=50, ge=0, le=100000)
    promote_interval_seconds: float = Field(default=0.25, gt=0)
    dispatch_grace_seconds: float = Field(default=5.0, ge=0)
    # A schedule's slot more than this late (nothing was running) is "missed" (skip/run_once).
    schedule_grace_seconds: float = Field(default=60.0, ge=1)
    dispatch_check_seconds: float = Field(default=120.0, gt=0)
    db_pool_size: int = Field(default=10, ge=1)
    db_max_overflow: int = Field(default=10, ge=0)
    db_pool_timeout_seconds: float = Field(default=2.0, gt=0)
    db_statement_timeout_ms: int = Field(default=15000, ge=0)
    # What sits between Conveyor and Postgres (ADR 0020). `transaction`: a pooler that hands a
    # server connection out per transaction (PgBouncer pool_mode=transaction), which carries
    # no session state: no session settings are sent and asyncpg's statement cache is off.
    db_pooler: Literal["none", "transaction"] = "none"
    # asyncpg's prepared-statement cache; unset: on, except behind a transaction pooler. Set it
    # true behind a pooler that carries protocol-level prepared statements (PgBouncer >= 1.21
    # with max_prepared_statements > 0) to keep the fast path.
    db_statement_cache: bool | None = None
    redis_timeout_seconds: float = Field(default=2.0, gt=0)
    rate_limit_per_second: float = Field(default=0.0, ge=0)
    rate_limit_burst: int = Field(default=0, ge=0)
    http_allowed_hosts: str = ""
    allowed_hosts: str = "localhost,127.0.0.1,[::1]"
    keepalive_seconds: int = Field(default=75, ge=1)
    http_signing_secret: str | None = None
    # How often an API process asks Postgres, in one statement, which of the jobs its
    # ``?wait=`` requests wait for are done (covers a lost notification or Redis down).
    wait_recheck_seconds: float = Field(default=2.0, gt=0, le=60)
    # Finished jobs (with their events and idempotency keys) are deleted this long after they
    # finished; 0 keeps them forever. A job type may override them (``@job_type(retention=)``).
    retention_succeeded_seconds: float = Field(default=7 * 86400, ge=0, le=MAX_RETENTION_SECONDS)
    retention_cancelled_seconds: float = Field(default=7 * 86400, ge=0, le=MAX_RETENTION_SECONDS)
    retention_dead_seconds: float = Field(default=30 * 86400, ge=0, le=MAX_RETENTION_SECONDS)
    # Completion callbacks: one POST's timeout, and how long failed deliveries are retried.
    callback_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    callback_retry_seconds: float = Field(default=86400.0, ge=0, le=MAX_RETENTION_SECONDS)
    log_level: str = "INFO"
    # json (the default of `conveyor api` and `conveyor worker`) or console (`conveyor dev`)
    log_format: Literal["json", "console"] | None = None
    worker_metrics_host: str = "127.0.0.1"  # where `conveyor worker --metrics-port` listens
    metrics_snapshot_seconds: float = Field(default=5.0, ge=0.5)
    dlq_alert_threshold: int | None = Field(default=None, ge=1)
    queue_age_alert_seconds: float | None = Field(default=None, gt=0)
    alert_webhook: str | None = None
    alert_interval_seconds: float = Field(default=5.0, gt=0)

    @property
    def db_statement_cache_enabled(self) -> bool:
        """Whether connections may keep named prepared statements across transactions."""
        if self.db_statement_cache is not None:
            return self.db_statement_cache
        return self.db_pooler == "none"

    @property
    def handler_module_list(self) -> list[str]:
        """The modules whose import registers job types: the built-in ones first, each once.
        The API and the workers load this same list."""
        configured = [m.strip() for m in self.handler_modules.split(",") if m.strip()]
        return list(dict.fromkeys([*BUILTIN_HANDLER_MODULES, *configured]))


@lru_cache
def get_settings() -> Settings:
    return Settings()
