"""audit records

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_records",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column(
            "time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.Column("identity", sa.Text(), nullable=False),
        sa.Column("on_behalf_of", sa.Text(), server_default="", nullable=False),
        sa.Column("proxy", sa.Text(), server_default="", nullable=False),
        sa.Column("rpc", sa.Text(), nullable=False),
        sa.Column("resource", sa.Text(), server_default="", nullable=False),
        sa.Column("outcome", sa.Text(), nullable=False),
        sa.Column("detail", sa.Text(), server_default="", nullable=False),
        sa.Column("peer", sa.Text(), server_default="", nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_records")),
    )
    op.create_index("ix_audit_records_identity_id", "audit_records", ["identity", "id"])
    op.create_index("ix_audit_records_outcome_id", "audit_records", ["outcome", "id"])
    # Append-only for the application role too: a compromised service cannot rewrite history
    # through SQL it is allowed to run on other tables.
    op.execute(
        """
        CREATE FUNCTION audit_records_append_only() RETURNS trigger AS $$
        BEGIN
            RAISE EXCEPTION 'audit_records is append-only';
        END;
        $$ LANGUAGE plpgsql
        """
    )
    op.execute(
        """
        CREATE TRIGGER audit_records_append_only
        BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_records
        FOR EACH STATEMENT EXECUTE FUNCTION audit_records_append_only()
        """
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER audit_records_append_only ON audit_records")
    op.execute("DROP FUNCTION audit_records_append_only()")
    op.drop_index("ix_audit_records_outcome_id", table_name="audit_records")
    op.drop_index("ix_audit_records_identity_id", table_name="audit_records")
    op.drop_table("audit_records")
