"""The tables both services share. Migrations in shared/db/migrations create them."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    UniqueConstraint,
    Uuid,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

NOW = text("now()")
EMPTY_OBJECT = text("'{}'::jsonb")
EMPTY_ARRAY = text("'[]'::jsonb")


def _time(name: str, *, nullable: bool = False) -> Column[object]:
    return Column(
        name, DateTime(timezone=True), nullable=nullable, server_default=None if nullable else NOW
    )


training_runs = Table(
    "training_runs",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("display_name", Text, nullable=False),
    Column("labels", JSONB, nullable=False, server_default=EMPTY_OBJECT),
    Column("state", Text, nullable=False),
    # The exact spec, defaults filled in (proto JSON of TrainingSpec).
    Column("spec", JSONB, nullable=False),
    Column("architecture", Text, nullable=False),
    Column("dataset_uri", Text, nullable=False),
    # No foreign key: a finished run keeps naming the base model it trained from after
    # that model is deleted (the registry refuses to delete the base of an unfinished run).
    Column("base_model_id", Uuid, nullable=True),
    Column("creator", Text, nullable=False),
    # The FAILED or CANCELLED run this one retries.
    Column("retry_of_id", Uuid, ForeignKey("training_runs.id", ondelete="SET NULL"), nullable=True),
    Column("request_id", Uuid, nullable=True),
    # sha256 of the create request: the same request_id with another body is refused.
    Column("request_hash", Text, nullable=True),
    Column("attempt", Integer, nullable=False, server_default=text("1")),
    Column("progress", JSONB, nullable=True),
    Column("latest_evaluation", JSONB, nullable=True),
    Column("best_evaluation", JSONB, nullable=True),
    # The test split's evaluation with the best checkpoint (proto JSON of Evaluation).
    Column("test_evaluation", JSONB, nullable=True),
    Column("dataset", JSONB, nullable=True),
    Column("failure_reason", Text, nullable=True),
    Column("failure_message", Text, nullable=True),
    Column("artifacts", JSONB, nullable=False, server_default=EMPTY_ARRAY),
    Column("facts", JSONB, nullable=True),
    Column("epoch_metrics", JSONB, nullable=False, server_default=EMPTY_ARRAY),
    Column("worker_id", Text, nullable=True),
    _time("heartbeat_time", nullable=True),
    # Sequence of the newest row in training_run_events.
    Column("last_sequence", BigInteger, nullable=False, server_default=text("0")),
    Column("version", Integer, nullable=False, server_default=text("1")),
    _time("create_time"),
    _time("update_time"),
    _time("start_time", nullable=True),
    _time("end_time", nullable=True),
    # "training", or "evaluation": the job of a model evaluation (model_evaluations),
    # run through the same queue, claims and events.
    Column("kind", Text, nullable=False, server_default="training"),
    # The serialized TrainingRun that Get and List return, but for what other tables say
    # (services.training_runs.messages.stored_message), written with every change of the
    # row. Null for a row written before migration 0010 (or by SQL of other writers):
    # rebuilt from the columns on its first read, and stored then.
    Column("proto", LargeBinary, nullable=True),
    CheckConstraint("kind IN ('training', 'evaluation')", name="kind"),
    UniqueConstraint("creator", "request_id", name="uq_training_runs_creator_request_id"),
    Index("ix_training_runs_create_time_id", "create_time", "id"),
    Index("ix_training_runs_state_create_time_id", "state", "create_time", "id"),
    Index("ix_training_runs_base_model_id", "base_model_id"),
    Index("ix_training_runs_dataset_uri_create_time", "dataset_uri", "create_time", "id"),
    Index("ix_training_runs_creator_create_time", "creator", "create_time", "id"),
    # Finds active runs whose worker went quiet without scanning finished ones.
    Index(
        "ix_training_runs_active_heartbeat",
        "heartbeat_time",
        postgresql_where=text("state IN ('PREPARING', 'RUNNING', 'CANCELLING')"),
    ),
)

training_run_events = Table(
    "training_run_events",
    metadata,
    Column("run_id", Uuid, ForeignKey("training_runs.id", ondelete="CASCADE"), nullable=False),
    Column("sequence", BigInteger, nullable=False),
    _time("time"),
    Column("attempt", Integer, nullable=False),
    Column("actor", Text, nullable=False),
    # The TrainingRunEvent payload oneof: "state_changed", "progress", ...
    Column("kind", Text, nullable=False),
    # Proto JSON of the payload message.
    Column("payload", JSONB, nullable=False),
    PrimaryKeyConstraint("run_id", "sequence", name="pk_training_run_events"),
)

trained_models = Table(
    "trained_models",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("display_name", Text, nullable=False),
    Column("description", Text, nullable=False, server_default=""),
    Column("labels", JSONB, nullable=False, server_default=EMPTY_OBJECT),
    # Unique: a run registers at most one model, however often its result is delivered.
    Column(
        "training_run_id",
        Uuid,
        ForeignKey("training_runs.id", ondelete="SET NULL"),
        nullable=True,
        unique=True,
    ),
    Column("base_model_id", Uuid, ForeignKey("trained_models.id"), nullable=True),
    Column("dataset_uri", Text, nullable=False, server_default=""),
    Column("dataset_fingerprint", Text, nullable=False, server_default=""),
    Column("architecture", Text, nullable=False),
    Column("classes", JSONB, nullable=False),
    Column("artifacts", JSONB, nullable=False),
    # What the model is judged by: its test evaluation when its dataset had a test split,
    # else the best epoch's validation.
    Column("evaluation", JSONB, nullable=True),
    # The best epoch's validation, which chose the checkpoint (models from runs).
    Column("val_evaluation", JSONB, nullable=True),
    Column("facts", JSONB, nullable=True),
    # Headline metric, copied out of evaluation for ordering and filtering.
    Column("bbox_map", Float, nullable=True),
    Column("published", Boolean, nullable=False, server_default=text("false")),
    Column("channel", Text, nullable=True),
    _time("publish_time", nullable=True),
    Column("published_by", Text, nullable=True),
    Column("creator", Text, nullable=False),
    # "run" (registered from a succeeded run) or "import" (an uploaded root model).
    Column("origin", Text, nullable=False, server_default="run"),
    # Caller-chosen id of an import: repeating it returns the model it created.
    Column("request_id", Uuid, nullable=True),
    Column("version", Integer, nullable=False, server_default=text("1")),
    _time("create_time"),
    _time("update_time"),
    CheckConstraint("base_model_id IS NULL OR base_model_id <> id", name="not_own_base"),
    CheckConstraint("origin IN ('run', 'import')", name="origin"),
    CheckConstraint("NOT published OR channel IS NOT NULL", name="published_in_a_channel"),
    UniqueConstraint("creator", "request_id", name="uq_trained_models_creator_request_id"),
    Index("ix_trained_models_create_time_id", "create_time", "id"),
    Index("ix_trained_models_base_model_id", "base_model_id"),
    Index("ix_trained_models_published", "published", "create_time", "id"),
    # At most one published model per channel, whatever races the service lets through.
    Index(
        "uq_trained_models_published_channel",
        "channel",
        unique=True,
        postgresql_where=text("published"),
    ),
)

# What a model evaluation asked for and found. Its id is the id of the job that runs it
# (a training_runs row of kind "evaluation"), which holds its state, attempts and events.
model_evaluations = Table(
    "model_evaluations",
    metadata,
    Column("id", Uuid, ForeignKey("training_runs.id", ondelete="CASCADE"), primary_key=True),
    Column(
        "trained_model_id",
        Uuid,
        ForeignKey("trained_models.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("dataset_uri", Text, nullable=False),
    Column("image_root", Text, nullable=False, server_default=""),
    # "all", "train", "val" or "test".
    Column("split", Text, nullable=False),
    # The run whose split was meant (its seed and fractions drew it).
    Column("split_of_id", Uuid, nullable=True),
    Column("score_threshold", Float, nullable=False),
    Column("iou_threshold", Float, nullable=False),
    Column("samples", Integer, nullable=False),
    Column("creator", Text, nullable=False),
    _time("create_time"),
    # Set when the job succeeds.
    Column("dataset_fingerprint", Text, nullable=True),
    Column("images_fingerprint", Text, nullable=True),
    Column("image_count", Integer, nullable=True),
    # Proto JSON of Evaluation and of DetectionReview.
    Column("evaluation", JSONB, nullable=True),
    Column("review", JSONB, nullable=True),
    Column("artifacts", JSONB, nullable=False, server_default=EMPTY_ARRAY),
    CheckConstraint("split IN ('all', 'train', 'val', 'test')", name="split"),
    Index("ix_model_evaluations_model_create_time", "trained_model_id", "create_time", "id"),
    # Every model's evaluations, newest first (ListModelEvaluations of trainedModels/-).
    Index("ix_model_evaluations_create_time_id", "create_time", "id"),
    Index("ix_model_evaluations_images", "dataset_fingerprint", "split", "create_time", "id"),
)

# Every publication and unpublication, kept after the model is deleted: answers
# "which model was published in this channel at time T".
trained_model_publications = Table(
    "trained_model_publications",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("trained_model_id", Uuid, nullable=False),
    # "published" or "unpublished".
    Column("action", Text, nullable=False),
    Column("channel", Text, nullable=False),
    Column("actor", Text, nullable=False),
    Column("reason", Text, nullable=False, server_default=""),
    _time("time"),
    # The model this publication took the channel from.
    Column("replaced_model_id", Uuid, nullable=True),
    Column("bbox_map", Float, nullable=True),
    # Proto JSON of IncumbentComparison, when the publication was compared with the
    # channel's model; names both evaluations.
    Column("incumbent_comparison", JSONB, nullable=True),
    CheckConstraint("action IN ('published', 'unpublished')", name="action"),
    Index("ix_trained_model_publications_model", "trained_model_id", "id"),
    Index("ix_trained_model_publications_channel", "channel", "id"),
)

# Models deleted from the registry, written in the deleting transaction: their files
# are removed after the commit (a sweep at startup finishes what a crash interrupted),
# and a run whose model was deleted is told apart from one whose model is not yet registered.
trained_model_deletions = Table(
    "trained_model_deletions",
    metadata,
    Column("trained_model_id", Uuid, primary_key=True),
    Column("training_run_id", Uuid, nullable=True),
    Column("artifacts", JSONB, nullable=False),
    Column("actor", Text, nullable=False),
    _time("delete_time"),
    _time("files_removed_time", nullable=True),
    Index("ix_trained_model_deletions_training_run_id", "training_run_id"),
    Index(
        "ix_trained_model_deletions_pending",
        "delete_time",
        postgresql_where=text("files_removed_time IS NULL"),
    ),
)

# Rows written in the same transaction as the change they announce; the relay
# publishes them to JetStream (Nats-Msg-Id = msg_id) and deletes them.
outbox = Table(
    "outbox",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("subject", Text, nullable=False),
    Column("msg_id", Text, nullable=False),
    Column("payload", LargeBinary, nullable=False),
    _time("create_time"),
    # Failed publishes of this row while other rows of its batch were published.
    Column("failures", Integer, nullable=False, server_default=text("0")),
    # The W3C traceparent of the span that wrote the row (migration 0008); null outside
    # any trace. The relay's publish span continues it and sends it in the headers.
    Column("traceparent", Text, nullable=True),
)

# Outbox rows the relay cannot ever publish (larger than the NATS max payload, refused
# by the server for themselves): moved here, logged and counted, so that one such row
# never holds back the rows behind it.
outbox_dead_letters = Table(
    "outbox_dead_letters",
    metadata,
    # The outbox row's id.
    Column("id", BigInteger, primary_key=True, autoincrement=False),
    Column("subject", Text, nullable=False),
    Column("msg_id", Text, nullable=False),
    Column("payload", LargeBinary, nullable=False),
    Column("size_bytes", Integer, nullable=False),
    Column("error", Text, nullable=False),
    Column("create_time", DateTime(timezone=True), nullable=False),
    _time("dead_letter_time"),
)

# Messages a consumer has applied, written in the same transaction as their
# effect: a redelivered message is recognised and skipped.
processed_messages = Table(
    "processed_messages",
    metadata,
    Column("consumer", Text, nullable=False),
    Column("message_id", Text, nullable=False),
    _time("processed_time"),
    PrimaryKeyConstraint("consumer", "message_id", name="pk_processed_messages"),
    # The retention prune (shared/retention.py) deletes by age.
    Index("ix_processed_messages_processed_time", "processed_time"),
)

# Every state-changing call and every refused call (shared/auth/audit.py). Append-only:
# a trigger (migration 0004) refuses UPDATE and DELETE; only prune_audit_records (migration
# 0009) deletes, and only rows past the retention period.
audit_records = Table(
    "audit_records",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    _time("time"),
    Column("identity", Text, nullable=False),
    Column("on_behalf_of", Text, nullable=False, server_default=""),
    Column("proxy", Text, nullable=False, server_default=""),
    Column("rpc", Text, nullable=False),
    Column("resource", Text, nullable=False, server_default=""),
    Column("outcome", Text, nullable=False),
    Column("detail", Text, nullable=False, server_default=""),
    Column("peer", Text, nullable=False, server_default=""),
    Index("ix_audit_records_identity_id", "identity", "id"),
    Index("ix_audit_records_outcome_id", "outcome", "id"),
    Index("ix_audit_records_time", "time"),
)

OUTBOX_CHANNEL = "raven_outbox"
