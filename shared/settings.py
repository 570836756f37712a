"""Settings of every process, read from `RAVEN_*` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DATA_DIR = Path(".data")


class Settings(BaseSettings):
    """One settings object per process, built in its composition root."""

    model_config = SettingsConfigDict(env_prefix="RAVEN_", extra="ignore")

    database_url: str = "postgresql+asyncpg://postgres@127.0.0.1:5432/raven"
    nats_url: str = "nats://127.0.0.1:4222"
    # Prefix of every stream, subject and durable consumer: separate stacks
    # (or test sessions) can share one NATS server.
    nats_namespace: str = "raven"
    artifact_root: Path = DEFAULT_DATA_DIR / "artifacts"
    training_runs_addr: str = "127.0.0.1:50051"
    trained_models_addr: str = "127.0.0.1:50052"
    log_level: str = "INFO"
    log_json: bool = False

    # Seconds a worker may go silent before its job is redelivered.
    job_ack_wait_s: float = Field(default=60.0, gt=0)
    job_max_deliver: int = Field(default=3, ge=1)
    # An active run whose worker is silent this long is queued again (or FAILED
    # with worker_lost after max_attempts).
    worker_lost_timeout_s: float = Field(default=120.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    # Jobs one worker trains at once.
    worker_concurrency: int = Field(default=1, ge=1)
    worker_id: str = ""
    # "auto", "cpu" or "cuda".
    worker_device: str = "auto"

    # Publication policy: a model needs at least this coco/bbox_mAP to be published
    # (a request may ask for more, never less); None leaves it to the request.
    publish_min_bbox_map: float | None = Field(default=None, ge=0, le=1)
    # The channel a publish request without one goes to.
    default_publish_channel: str = "production"
    # Seconds the child process that checks an imported config and checkpoint may take.
    import_verify_timeout_s: float = Field(default=180.0, gt=0)
    # Largest config plus checkpoint an import may upload.
    import_max_bytes: int = Field(default=4 * 1024**3, gt=0)

    def resolved_artifact_root(self) -> Path:
        return self.artifact_root.expanduser().resolve()
