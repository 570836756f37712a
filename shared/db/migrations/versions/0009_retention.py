"""retention: a sanctioned delete path for old audit records, indexes for the prune

Revision ID: 0009
Revises: 0008

audit_records stays append-only for every statement but one: `prune_audit_records(cutoff)`
(SECURITY DEFINER) deletes the rows older than `cutoff`, which must lie at least
AUDIT_FLOOR in the past. UPDATE and TRUNCATE are still refused outright; a DELETE is
refused row by row unless it runs inside that function (a transaction-local setting it
sets and clears) and the row is older than the function's cutoff.
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

# No audit record younger than this can be deleted, whatever the caller asks.
AUDIT_FLOOR = "7 days"


def upgrade() -> None:
    op.create_index(
        "ix_processed_messages_processed_time", "processed_messages", ["processed_time"]
    )
    op.create_index("ix_audit_records_time", "audit_records", ["time"])
    op.execute("DROP TRIGGER audit_records_append_only ON audit_records")
    op.execute(
        """
        CREATE TRIGGER audit_records_append_only
        BEFORE UPDATE OR TRUNCATE ON audit_records
        FOR EACH STATEMENT EXECUTE FUNCTION audit_records_append_only()
        """
    )
    op.execute(
        f"""
        CREATE FUNCTION audit_records_retention_only() RETURNS trigger AS $$
        DECLARE
            cutoff text := current_setting('raven.audit_prune_cutoff', true);
        BEGIN
            IF cutoff IS NULL OR cutoff = '' THEN
                RAISE EXCEPTION 'audit_records is append-only: old rows go through prune_audit_records()';
            END IF;
            IF cutoff::timestamptz > now() - interval '{AUDIT_FLOOR}'
               OR OLD.time >= cutoff::timestamptz THEN
                RAISE EXCEPTION 'audit record % is within the retention period', OLD.id;
            END IF;
            RETURN OLD;
        END;
        $$ LANGUAGE plpgsql
        """
    )
    op.execute(
        """
        CREATE TRIGGER audit_records_retention_only
        BEFORE DELETE ON audit_records
        FOR EACH ROW EXECUTE FUNCTION audit_records_retention_only()
        """
    )
    op.execute(
        f"""
        CREATE FUNCTION prune_audit_records(cutoff timestamptz, batch integer)
        RETURNS bigint
        LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
        DECLARE
            removed bigint;
        BEGIN
            IF cutoff > now() - interval '{AUDIT_FLOOR}' THEN
                RAISE EXCEPTION 'audit records are kept at least {AUDIT_FLOOR}';
            END IF;
            PERFORM set_config('raven.audit_prune_cutoff', cutoff::text, true);
            DELETE FROM audit_records WHERE id IN (
                SELECT id FROM audit_records WHERE time < cutoff ORDER BY id LIMIT batch
            );
            GET DIAGNOSTICS removed = ROW_COUNT;
            PERFORM set_config('raven.audit_prune_cutoff', '', true);
            RETURN removed;
        END;
        $$
        """
    )


def downgrade() -> None:
    op.execute("DROP FUNCTION prune_audit_records(timestamptz, integer)")
    op.execute("DROP TRIGGER audit_records_retention_only ON audit_records")
    op.execute("DROP FUNCTION audit_records_retention_only()")
    op.execute("DROP TRIGGER audit_records_append_only ON audit_records")
    op.execute(
        """
        CREATE TRIGGER audit_records_append_only
        BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_records
        FOR EACH STATEMENT EXECUTE FUNCTION audit_records_append_only()
        """
    )
    op.drop_index("ix_audit_records_time", table_name="audit_records")
    op.drop_index("ix_processed_messages_processed_time", table_name="processed_messages")
