"""initial schema

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "outbox",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("msg_id", sa.Text(), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column(
            "create_time",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox")),
    )
    op.create_table(
        "processed_messages",
        sa.Column("consumer", sa.Text(), nullable=False),
        sa.Column("message_id", sa.Text(), nullable=False),
        sa.Column(
            "processed_time",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("consumer", "message_id", name="pk_processed_messages"),
    )
    op.create_table(
        "training_runs",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("display_name", sa.Text(), nullable=False),
        sa.Column(
            "labels",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("spec", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("architecture", sa.Text(), nullable=False),
        sa.Column("dataset_uri", sa.Text(), nullable=False),
        sa.Column("base_model_id", sa.Uuid(), nullable=True),
        sa.Column("creator", sa.Text(), nullable=False),
        sa.Column("request_id", sa.Uuid(), nullable=True),
        sa.Column("request_hash", sa.Text(), nullable=True),
        sa.Column("attempt", sa.Integer(), server_default=sa.text("1"), nullable=False),
        sa.Column("progress", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("latest_evaluation", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("best_evaluation", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("dataset", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("failure_reason", sa.Text(), nullable=True),
        sa.Column("failure_message", sa.Text(), nullable=True),
        sa.Column(
            "artifacts",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'[]'::jsonb"),
            nullable=False,
        ),
        sa.Column("facts", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column(
            "epoch_metrics",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'[]'::jsonb"),
            nullable=False,
        ),
        sa.Column("worker_id", sa.Text(), nullable=True),
        sa.Column("heartbeat_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_sequence", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("version", sa.Integer(), server_default=sa.text("1"), nullable=False),
        sa.Column(
            "create_time",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "update_time",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("start_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("end_time", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_training_runs")),
        sa.UniqueConstraint("creator", "request_id", name="uq_training_runs_creator_request_id"),
    )
    op.create_index(
        "ix_training_runs_active_heartbeat",
        "training_runs",
        ["heartbeat_time"],
        unique=False,
        postgresql_where=sa.text("state IN ('PREPARING', 'RUNNING', 'CANCELLING')"),
    )
    op.create_index(
        "ix_training_runs_base_model_id", "training_runs", ["base_model_id"], unique=False
    )
    op.create_index(
        "ix_training_runs_create_time_id", "training_runs", ["create_time", "id"], unique=False
    )
    op.create_index(
        "ix_training_runs_creator_create_time",
        "training_runs",
        ["creator", "create_time", "id"],
        unique=False,
    )
    op.create_index(
        "ix_training_runs_dataset_uri_create_time",
        "training_runs",
        ["dataset_uri", "create_time", "id"],
        unique=False,
    )
    op.create_index(
        "ix_training_runs_state_create_time_id",
        "training_runs",
        ["state", "create_time", "id"],
        unique=False,
    )
    op.create_table(
        "trained_models",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("display_name", sa.Text(), nullable=False),
        sa.Column("description", sa.Text(), server_default="", nullable=False),
        sa.Column(
            "labels",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("training_run_id", sa.Uuid(), nullable=True),
        sa.Column("base_model_id", sa.Uuid(), nullable=True),
        sa.Column("dataset_uri", sa.Text(), server_default="", nullable=False),
        sa.Column("dataset_fingerprint", sa.Text(), server_default="", nullable=False),
        sa.Column("architecture", sa.Text(), nullable=False),
        sa.Column("classes", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("artifacts", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("evaluation", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("facts", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("bbox_map", sa.Float(), nullable=True),
        sa.Column("published", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("channel", sa.Text(), nullable=True),
        sa.Column("publish_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("published_by", sa.Text(), nullable=True),
        sa.Column("creator", sa.Text(), nullable=False),
        sa.Column("version", sa.Integer(), server_default=sa.text("1"), nullable=False),
        sa.Column(
            "create_time",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "update_time",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "base_model_id IS NULL OR base_model_id <> id",
            name=op.f("ck_trained_models_not_own_base"),
        ),
        sa.ForeignKeyConstraint(
            ["base_model_id"],
            ["trained_models.id"],
            name=op.f("fk_trained_models_base_model_id_trained_models"),
        ),
        sa.ForeignKeyConstraint(
            ["training_run_id"],
            ["training_runs.id"],
            name=op.f("fk_trained_models_training_run_id_training_runs"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_trained_models")),
        sa.UniqueConstraint("training_run_id", name=op.f("uq_trained_models_training_run_id")),
    )
    op.create_index(
        "ix_trained_models_base_model_id", "trained_models", ["base_model_id"], unique=False
    )
    op.create_index(
        "ix_trained_models_create_time_id", "trained_models", ["create_time", "id"], unique=False
    )
    op.create_index(
        "ix_trained_models_published",
        "trained_models",
        ["published", "create_time", "id"],
        unique=False,
    )
    op.create_table(
        "training_run_events",
        sa.Column("run_id", sa.Uuid(), nullable=False),
        sa.Column("sequence", sa.BigInteger(), nullable=False),
        sa.Column(
            "time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("actor", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("payload", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["training_runs.id"],
            name=op.f("fk_training_run_events_run_id_training_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("run_id", "sequence", name="pk_training_run_events"),
    )
    # trained_models and training_runs reference each other: this key comes last.
    op.create_foreign_key(
        op.f("fk_training_runs_base_model_id_trained_models"),
        "training_runs",
        "trained_models",
        ["base_model_id"],
        ["id"],
    )


def downgrade() -> None:
    op.drop_constraint(
        op.f("fk_training_runs_base_model_id_trained_models"), "training_runs", type_="foreignkey"
    )
    op.drop_table("training_run_events")
    op.drop_index("ix_trained_models_published", table_name="trained_models")
    op.drop_index("ix_trained_models_create_time_id", table_name="trained_models")
    op.drop_index("ix_trained_models_base_model_id", table_name="trained_models")
    op.drop_table("trained_models")
    op.drop_index("ix_training_runs_state_create_time_id", table_name="training_runs")
    op.drop_index("ix_training_runs_dataset_uri_create_time", table_name="training_runs")
    op.drop_index("ix_training_runs_creator_create_time", table_name="training_runs")
    op.drop_index("ix_training_runs_create_time_id", table_name="training_runs")
    op.drop_index("ix_training_runs_base_model_id", table_name="training_runs")
    op.drop_index(
        "ix_training_runs_active_heartbeat",
        table_name="training_runs",
        postgresql_where=sa.text("state IN ('PREPARING', 'RUNNING', 'CANCELLING')"),
    )
    op.drop_table("training_runs")
    op.drop_table("processed_messages")
    op.drop_table("outbox")
