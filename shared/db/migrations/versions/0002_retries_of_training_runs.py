"""retries of training runs

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("training_runs", sa.Column("retry_of_id", sa.Uuid(), nullable=True))
    op.create_foreign_key(
        op.f("fk_training_runs_retry_of_id_training_runs"),
        "training_runs",
        "training_runs",
        ["retry_of_id"],
        ["id"],
        ondelete="SET NULL",
    )


def downgrade() -> None:
    op.drop_constraint(
        op.f("fk_training_runs_retry_of_id_training_runs"), "training_runs", type_="foreignkey"
    )
    op.drop_column("training_runs", "retry_of_id")
