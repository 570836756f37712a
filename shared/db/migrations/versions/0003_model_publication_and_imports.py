"""model publication and imports

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "trained_model_publications",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("trained_model_id", sa.Uuid(), nullable=False),
        sa.Column("action", sa.Text(), nullable=False),
        sa.Column("channel", sa.Text(), nullable=False),
        sa.Column("actor", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), server_default="", nullable=False),
        sa.Column(
            "time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.Column("replaced_model_id", sa.Uuid(), nullable=True),
        sa.Column("bbox_map", sa.Float(), nullable=True),
        sa.CheckConstraint(
            "action IN ('published', 'unpublished')",
            name=op.f("ck_trained_model_publications_action"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_trained_model_publications")),
    )
    op.create_index(
        "ix_trained_model_publications_channel",
        "trained_model_publications",
        ["channel", "id"],
        unique=False,
    )
    op.create_index(
        "ix_trained_model_publications_model",
        "trained_model_publications",
        ["trained_model_id", "id"],
        unique=False,
    )
    op.create_table(
        "trained_model_deletions",
        sa.Column("trained_model_id", sa.Uuid(), nullable=False),
        sa.Column("training_run_id", sa.Uuid(), nullable=True),
        sa.Column("artifacts", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("actor", sa.Text(), nullable=False),
        sa.Column(
            "delete_time",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("files_removed_time", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("trained_model_id", name=op.f("pk_trained_model_deletions")),
    )
    op.create_index(
        "ix_trained_model_deletions_pending",
        "trained_model_deletions",
        ["delete_time"],
        unique=False,
        postgresql_where=sa.text("files_removed_time IS NULL"),
    )
    op.create_index(
        "ix_trained_model_deletions_training_run_id",
        "trained_model_deletions",
        ["training_run_id"],
        unique=False,
    )
    op.add_column(
        "trained_models", sa.Column("origin", sa.Text(), server_default="run", nullable=False)
    )
    op.add_column("trained_models", sa.Column("request_id", sa.Uuid(), nullable=True))
    op.create_unique_constraint(
        "uq_trained_models_creator_request_id", "trained_models", ["creator", "request_id"]
    )
    # Models published before channels existed go to the default one.
    op.execute(
        "UPDATE trained_models SET channel = 'production' WHERE published AND channel IS NULL"
    )
    op.create_check_constraint(
        op.f("ck_trained_models_origin"), "trained_models", "origin IN ('run', 'import')"
    )
    op.create_check_constraint(
        op.f("ck_trained_models_published_in_a_channel"),
        "trained_models",
        "NOT published OR channel IS NOT NULL",
    )
    op.create_index(
        "uq_trained_models_published_channel",
        "trained_models",
        ["channel"],
        unique=True,
        postgresql_where=sa.text("published"),
    )
    op.drop_constraint(
        op.f("fk_training_runs_base_model_id_trained_models"), "training_runs", type_="foreignkey"
    )


def downgrade() -> None:
    op.create_foreign_key(
        op.f("fk_training_runs_base_model_id_trained_models"),
        "training_runs",
        "trained_models",
        ["base_model_id"],
        ["id"],
    )
    op.drop_index(
        "uq_trained_models_published_channel",
        table_name="trained_models",
        postgresql_where=sa.text("published"),
    )
    op.drop_constraint(
        op.f("ck_trained_models_published_in_a_channel"), "trained_models", type_="check"
    )
    op.drop_constraint(op.f("ck_trained_models_origin"), "trained_models", type_="check")
    op.drop_constraint("uq_trained_models_creator_request_id", "trained_models", type_="unique")
    op.drop_column("trained_models", "request_id")
    op.drop_column("trained_models", "origin")
    op.drop_index("ix_trained_model_publications_model", table_name="trained_model_publications")
    op.drop_index("ix_trained_model_publications_channel", table_name="trained_model_publications")
    op.drop_table("trained_model_publications")
    op.drop_index(
        "ix_trained_model_deletions_training_run_id", table_name="trained_model_deletions"
    )
    op.drop_index(
        "ix_trained_model_deletions_pending",
        table_name="trained_model_deletions",
        postgresql_where=sa.text("files_removed_time IS NULL"),
    )
    op.drop_table("trained_model_deletions")
