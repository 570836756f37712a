"""model evaluations: jobs of kind "evaluation", their requests and findings, and
publications compared with the channel's model

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "training_runs",
        sa.Column("kind", sa.Text(), server_default="training", nullable=False),
    )
    op.create_check_constraint(
        "ck_training_runs_kind", "training_runs", "kind IN ('training', 'evaluation')"
    )
    op.create_table(
        "model_evaluations",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("trained_model_id", sa.Uuid(), nullable=False),
        sa.Column("dataset_uri", sa.Text(), nullable=False),
        sa.Column("image_root", sa.Text(), server_default="", nullable=False),
        sa.Column("split", sa.Text(), nullable=False),
        sa.Column("split_of_id", sa.Uuid(), nullable=True),
        sa.Column("score_threshold", sa.Float(), nullable=False),
        sa.Column("iou_threshold", sa.Float(), nullable=False),
        sa.Column("samples", sa.Integer(), nullable=False),
        sa.Column("creator", sa.Text(), nullable=False),
        sa.Column(
            "create_time",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("dataset_fingerprint", sa.Text(), nullable=True),
        sa.Column("images_fingerprint", sa.Text(), nullable=True),
        sa.Column("image_count", sa.Integer(), nullable=True),
        sa.Column("evaluation", postgresql.JSONB(), nullable=True),
        sa.Column("review", postgresql.JSONB(), nullable=True),
        sa.Column(
            "artifacts", postgresql.JSONB(), server_default=sa.text("'[]'::jsonb"), nullable=False
        ),
        sa.CheckConstraint(
            "split IN ('all', 'train', 'val', 'test')", name="ck_model_evaluations_split"
        ),
        sa.ForeignKeyConstraint(
            ["id"],
            ["training_runs.id"],
            name="fk_model_evaluations_id_training_runs",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["trained_model_id"],
            ["trained_models.id"],
            name="fk_model_evaluations_trained_model_id_trained_models",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_model_evaluations"),
    )
    op.create_index(
        "ix_model_evaluations_model_create_time",
        "model_evaluations",
        ["trained_model_id", "create_time", "id"],
    )
    op.create_index(
        "ix_model_evaluations_create_time_id", "model_evaluations", ["create_time", "id"]
    )
    op.create_index(
        "ix_model_evaluations_images",
        "model_evaluations",
        ["dataset_fingerprint", "split", "create_time", "id"],
    )
    op.add_column(
        "trained_model_publications",
        sa.Column("incumbent_comparison", postgresql.JSONB(), nullable=True),
    )


def downgrade() -> None:
    op.drop_column("trained_model_publications", "incumbent_comparison")
    op.drop_index("ix_model_evaluations_images", table_name="model_evaluations")
    op.drop_index("ix_model_evaluations_create_time_id", table_name="model_evaluations")
    op.drop_index("ix_model_evaluations_model_create_time", table_name="model_evaluations")
    op.drop_table("model_evaluations")
    op.drop_constraint("ck_training_runs_kind", "training_runs", type_="check")
    op.drop_column("training_runs", "kind")
