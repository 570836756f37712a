"""test split evaluations: a run's test evaluation, a model's validation kept beside it

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "training_runs",
        sa.Column("test_evaluation", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    )
    op.add_column(
        "trained_models",
        sa.Column("val_evaluation", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    )
    # Models registered before: their evaluation is the best epoch's validation.
    op.execute(
        "UPDATE trained_models SET val_evaluation = evaluation "
        "WHERE origin = 'run' AND evaluation IS NOT NULL"
    )


def downgrade() -> None:
    op.drop_column("trained_models", "val_evaluation")
    op.drop_column("training_runs", "test_evaluation")
