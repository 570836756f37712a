"""Settings of every process, read from `RAVEN_*` environment variables."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.paths import DEFAULT_DATA_DIR, default_dev_certs_dir

__all__ = ["DEFAULT_DATA_DIR", "Settings"]


class Settings(BaseSettings):
    """One settings object per process, built in its composition root."""

    model_config = SettingsConfigDict(env_prefix="RAVEN_", extra="ignore")

    database_url: str = "postgresql+asyncpg://postgres@127.0.0.1:5432/raven"
    nats_url: str = "nats://127.0.0.1:4222"
    # Prefix of every stream, subject and durable consumer: separate stacks
    # (or test sessions) can share one NATS server.
    nats_namespace: str = "raven"
    artifact_root: Path = DEFAULT_DATA_DIR / "artifacts"
    # Where workers put new checkpoints and models: empty for the artifact root, or
    # s3://bucket/prefix. Recorded files are read wherever their URI points; the services
    # delete only those under it (give them the workers' value).
    artifact_store: str = ""
    # S3-compatible servers (MinIO, moto); empty: AWS, or AWS_ENDPOINT_URL_S3. Credentials
    # come from the standard AWS chain (AWS_ACCESS_KEY_ID..., ~/.aws, instance roles).
    s3_endpoint_url: str = ""
    s3_region: str = ""
    training_runs_addr: str = "127.0.0.1:50051"
    trained_models_addr: str = "127.0.0.1:50052"
    # Processes of a service on its one port (shared/prefork.py, docs/scaling.md): 1 is one
    # process; more fork that many children, the first of which runs the background loops.
    grpc_processes: int = Field(default=1, ge=1, le=64)
    log_level: str = "INFO"
    # Unset: JSON lines when stderr is not a terminal, text at a terminal.
    log_json: bool | None = None

    # Seconds a worker may go silent before its job is redelivered.
    job_ack_wait_s: float = Field(default=60.0, gt=0)
    job_max_deliver: int = Field(default=3, ge=1)
    # An active run whose worker is silent this long is queued again (or FAILED
    # with worker_lost after max_attempts).
    worker_lost_timeout_s: float = Field(default=120.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    # Jobs one worker trains at once; unset: one per GPU the worker sees, 1 without GPUs.
    worker_concurrency: int | None = Field(default=None, ge=1)
    worker_id: str = ""
    # "auto", "cpu" or "cuda".
    worker_device: str = "auto"
    # Loader processes per dataloader of a run (per GPU); unset: 4 per GPU, at most each
    # GPU's share of the worker's cores, and none on CPU (docs/training.md, "Data loading").
    worker_dataloader_workers: int | None = Field(default=None, ge=0, le=64)

    # Publication policy: a model needs at least this coco/bbox_mAP to be published
    # (a request may ask for more, never less); None leaves it to the request.
    publish_min_bbox_map: float | None = Field(default=None, ge=0, le=1)
    # Publication policy: a model may replace a channel's model (its incumbent) only when
    # evaluated on the same images as the incumbent and not worse there by more than the
    # tolerance (on the request's metric, coco/bbox_mAP by default). A request may ask for
    # the comparison, or a smaller tolerance, never waive or loosen the policy's.
    publish_require_incumbent: bool = False
    publish_incumbent_tolerance: float = Field(default=0.0, ge=0, le=1)
    # The channel a publish request without one goes to.
    default_publish_channel: str = "production"
    # Seconds the child process that checks an imported config and checkpoint may take.
    import_verify_timeout_s: float = Field(default=180.0, gt=0)
    # Largest config plus checkpoint an import may upload.
    import_max_bytes: int = Field(default=4 * 1024**3, gt=0)

    # Transport security (shared/auth). The certificate and key of this process (the
    # server certificate of a service, the client certificate of the CLI) and the CA
    # bundle peers are verified against. The CLI falls back to `make certs`' files.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_ca_file: Path | None = None
    # Clients: the name to check in the server certificate when the address is not it.
    tls_server_name: str = ""
    # Plaintext gRPC for local development: refused on a non-loopback address, warned at
    # start; every caller is `dev_identity` (with `admin` unless a policy file says otherwise).
    insecure_dev: bool = False
    dev_identity: str = "spiffe://raven.local/ns/dev/sa/developer"
    # Per user (shared/paths.py): `$XDG_CONFIG_HOME/raven/certs`, else ~/.config/raven/certs.
    dev_certs_dir: Path = Field(default_factory=default_dev_certs_dir)
    # SPIFFE ids of sidecars (Envoy, Istio) whose x-forwarded-client-cert header is believed
    # (JSON list in the environment).
    trusted_proxies: list[str] = Field(default_factory=list)
    # End-user bearer JWTs: issuer and audience required, RS256/ES256 public keys (PEM).
    jwt_issuer: str = ""
    jwt_audience: str = ""
    jwt_public_key_files: list[Path] = Field(default_factory=list)
    jwt_leeway_s: float = Field(default=30.0, ge=0)
    # Who may do what (TOML or JSON, shared/auth/policy.py); re-read when it changes,
    # checked at most this often. Without one every RPC but health and reflection is denied.
    auth_policy_file: Path | None = None
    auth_policy_check_interval_s: float = Field(default=1.0, ge=0)
    # NATS client TLS (tls:// URLs) and credentials (a .creds file: JWT + nkey seed).
    nats_tls_ca_file: Path | None = None
    nats_tls_cert_file: Path | None = None
    nats_tls_key_file: Path | None = None
    nats_creds_file: Path | None = None
    # Keys that sign page tokens (comma-separated, each at least 16 characters): the first
    # signs, all verify, so a key is rotated by putting the new one first. Replicas of a
    # service need the same keys; unset, each process signs with a random key of its own.
    page_token_keys: str = ""
    # Where this process serves Prometheus `/metrics` (docs/operations.md, "Metrics"); unset:
    # its own default (127.0.0.1:9464 TrainingRunService, :9465 TrainedModelService, :9466 a
    # worker); "" or "off": no metrics; port 0: a free port.
    metrics_addr: str | None = None

    # Retention (shared/retention.py, docs/operations.md "Retention"): one service process
    # at a time prunes, every retention_interval_s; each age is in days, 0 keeps forever.
    retention_interval_s: float = Field(default=3600.0, gt=0)
    # Redelivered worker events are recognised by these rows (only within ack waits).
    retention_processed_messages_days: int = Field(default=14, ge=0)
    # Audit records: 0, or at least 7 (the database refuses younger deletes).
    retention_audit_days: int = Field(default=365, ge=0)
    # Finished runs' attempt folders, but for the files recorded as artifacts.
    retention_work_dirs_days: int = Field(default=7, ge=0)
    # Progress entries of finished runs' histories (state changes, evaluations stay).
    retention_progress_events_days: int = Field(default=30, ge=0)

    # The trainer worker's health file for probes (trainer_worker/health.py); unset: none.
    worker_health_file: Path | None = None

    @field_validator("log_json", mode="before")
    @classmethod
    def _empty_log_json_is_unset(cls, value: object) -> object:
        # RAVEN_LOG_JSON= (empty) means the same as unset: chosen by the terminal.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("artifact_store")
    @classmethod
    def _artifact_store_is_s3(cls, value: str) -> str:
        parsed = urlparse(value)
        if value and (parsed.scheme != "s3" or not parsed.netloc):
            raise ValueError(
                f"artifact_store {value!r}: leave it empty (the artifact root) "
                "or name s3://bucket/prefix"
            )
        return value

    @field_validator("page_token_keys")
    @classmethod
    def _page_token_keys_are_long(cls, value: str) -> str:
        if any(0 < len(k.strip()) < 16 for k in value.split(",")):
            raise ValueError("page_token_keys: each key needs at least 16 characters")
        return value

    @field_validator("retention_audit_days")
    @classmethod
    def _audit_kept_a_week(cls, value: int) -> int:
        if 0 < value < 7:
            raise ValueError("retention_audit_days: 0 (keep forever) or at least 7")
        return value

    def page_token_key_list(self) -> list[str]:
        return [k.strip() for k in self.page_token_keys.split(",") if k.strip()]

    def resolved_artifact_root(self) -> Path:
        return self.artifact_root.expanduser().resolve()
