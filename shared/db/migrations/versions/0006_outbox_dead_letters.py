"""outbox dead letters: rows the relay cannot publish, set aside so that the rest flows

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Failed publishes of a row while other rows of its batch went out.
    op.add_column(
        "outbox",
        sa.Column("failures", sa.Integer(), server_default=sa.text("0"), nullable=False),
    )
    op.create_table(
        "outbox_dead_letters",
        # The outbox row's id: a row is set aside once.
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("msg_id", sa.Text(), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("size_bytes", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "dead_letter_time",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name="pk_outbox_dead_letters"),
    )


def downgrade() -> None:
    op.drop_table("outbox_dead_letters")
    op.drop_column("outbox", "failures")
