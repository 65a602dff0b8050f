"""Key instances by (study_instance_uid, sop_instance_uid) instead of the SOP Instance UID alone.

Why: a PACS re-sends an instance under a corrected study after a split or merge, and some
modalities reuse SOP UIDs. Keyed by the SOP UID alone, the image filed under the second study
was taken for a redelivery of the first and retired unscored: the second study never got a row
or a flag. Like Orthanc, which tells instances apart by Patient/Study/Series/SOP UIDs together,
the same SOP UID in another study is now another instance.

Every existing row is kept as it is: SOP UIDs were unique, so (study, SOP) pairs are too, and
study_instance_uid was already NOT NULL. PostgreSQL swaps the primary key in place (the
study_flags view, its grants and anything built on it stay); SQLite, which cannot alter a key,
copies the table (Alembic batch mode, indexes kept) in its legacy ALTER TABLE mode, so that the
views over `instances` stay as they are (none is dropped and re-created).

Stop every worker of the previous version before upgrading (and start the new ones after; with
TRIAGE_MIGRATE_ON_START the first new worker migrates): their upserts name the old key as the
conflict target. PostgreSQL refuses that once the key is gone, an error those workers do not
retry: the task fails, its file stays in pending/ and the gateway's sweep re-sends it after
TRIAGE_GATEWAY_REQUEUE_AFTER_SECONDS, to be scored by a new worker. Worse, an old worker that
meets a SOP UID already stored under another study still retires the file as a duplicate, the
defect this revision fixes.

The downgrade refuses while any SOP UID has rows in more than one study: going back would have
to drop one of them.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy import text

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

PK_NAME = "instances_pkey"  # PostgreSQL's name for the key 0001 created; SQLite keeps keys unnamed


def _unkeyed_instances() -> sa.Table:
    """`instances` as 0001 and 0002 left it, without its key: SQLite's copy gets the new key only
    (reflected, the old key would stay marked on sop_instance_uid and clash with the new one)."""
    table = sa.Table(
        "instances",
        sa.MetaData(),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("study_instance_uid", sa.String(64), nullable=False),
        sa.Column("series_instance_uid", sa.String(64)),
        sa.Column("accession_number", sa.String(64)),
        sa.Column("modality", sa.String(16)),
        sa.Column("spool_relpath", sa.String(300)),
        sa.Column("model_name", sa.String(100)),
        sa.Column("model_version", sa.String(50)),
        sa.Column("model_sha256", sa.String(64)),
        sa.Column("probability", sa.Float),
        sa.Column("prediction", sa.String(32)),
        sa.Column("stratum", sa.String(32)),
        sa.Column("severity", sa.Integer),
        sa.Column("flag", sa.String(32)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("received_at", sa.DateTime),
        sa.Column("started_at", sa.DateTime),
        sa.Column("finished_at", sa.DateTime),
        sa.Column("processing_ms", sa.Float),
        sa.Column("site_calibration_sha256", sa.String(64)),
    )
    for name, *columns in (("ix_instances_study_received", "study_instance_uid", "received_at"),
                           ("ix_instances_accession", "accession_number"),
                           ("ix_instances_status_finished", "status", "finished_at"),
                           ("ix_instances_stratum", "stratum"),
                           ("ix_instances_flag", "flag"),
                           ("ix_instances_received", "received_at"),
                           ("ix_instances_finished", "finished_at")):
        sa.Index(name, *[table.c[c] for c in columns])
    return table


def _set_primary_key(columns: list[str]) -> None:
    if op.get_bind().dialect.name == "postgresql":  # in place: the view, its grants and dependants stay
        op.drop_constraint(PK_NAME, "instances", type_="primary")
        op.create_primary_key(PK_NAME, "instances", columns)
        return
    # SQLite copies the table and renames the copy into place; with a view naming `instances`
    # (study_flags, a site's own report) its modern ALTER TABLE refuses that rename. The legacy
    # mode renames without checking views, which then read the new table by its unchanged name:
    # no view is dropped, so none can be lost when the copy fails (its driver commits DDL early).
    # A copy killed part-way (OOM, an evicted pod) by a release before 2026-11-29 left the copy's table
    # behind, committed on its own by the driver (env.py now runs each revision in one SQLite transaction):
    # the next attempt would fail on it forever.
    op.execute("DROP TABLE IF EXISTS _alembic_tmp_instances")
    op.execute("PRAGMA legacy_alter_table = ON")
    try:
        with op.batch_alter_table("instances", recreate="always", copy_from=_unkeyed_instances()) as batch:
            batch.create_primary_key(PK_NAME, columns)
    finally:
        op.execute("PRAGMA legacy_alter_table = OFF")


def upgrade() -> None:
    _set_primary_key(["study_instance_uid", "sop_instance_uid"])


def downgrade() -> None:
    shared = op.get_bind().execute(text(
        "SELECT COUNT(*) FROM (SELECT sop_instance_uid FROM instances GROUP BY sop_instance_uid"
        " HAVING COUNT(*) > 1) AS s")).scalar()
    if shared:
        # PostgreSQL rolls the whole downgrade back; SQLite has already committed the steps above this one
        raise RuntimeError(f"{shared} SOP Instance UID(s) have rows in more than one study; a downgrade would"
                           " have to drop rows, so it stops before 0003 (on SQLite the steps after 0003 are"
                           " already undone: the schema is at 0003; on PostgreSQL nothing was changed)")
    _set_primary_key(["sop_instance_uid"])
