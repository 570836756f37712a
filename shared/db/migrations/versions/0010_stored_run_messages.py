"""stored run messages: each training run's TrainingRun message, serialized, beside its
columns, so that reads return it without rebuilding it from JSON

Revision ID: 0010
Revises: 0009

No backfill here: a row without one is rebuilt from its columns when first read, and its
message stored then (services.training_runs.reads).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("training_runs", sa.Column("proto", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    op.drop_column("training_runs", "proto")
