"""Key instances by (study_instance_uid, sop_instance_uid) instead of the SOP Instance UID alone.

Why: a PACS re-sends an instance under a corrected study after a split or merge, and some
modalities reuse SOP UIDs. Keyed by the SOP UID alone, the image filed under the second study
was taken for a redelivery of the first and retired unscored: the second study never got a row
or a flag. Like Orthanc, which tells instances apart by Patient/Study/Series/SOP UIDs together,
the same SOP UID in another study is now another instance.

Every existing row is kept as it is: SOP UIDs were unique, so (study, SOP) pairs are too, and
study_instance_uid was already NOT NULL. PostgreSQL swaps the primary key in place; SQLite,
which cannot alter a key, copies the table (Alembic batch mode, indexes kept). The study_flags
view reads `instances`, so it is dropped first and created again unchanged (SQLite refuses to
drop or rename a table out from under a view that names it).

Stop workers of the previous version before upgrading: their upserts name the old key as the
conflict target, which PostgreSQL refuses once it is gone (the tasks are retried and their files
stay in pending/ for the sweep, so nothing is lost, but nothing is scored either).

The downgrade refuses while any SOP UID has rows in more than one study: going back would have
to drop one of them.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import importlib

import sqlalchemy as sa
from alembic import op
from sqlalchemy import text

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

PK_NAME = "instances_pkey"  # PostgreSQL's name for the key 0001 created; SQLite keeps keys unnamed


def _view_sql() -> str:
    return importlib.import_module("worker.migrations.versions.0001_initial").STUDY_FLAGS_VIEW


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
    bind = op.get_bind()
    op.execute("DROP VIEW IF EXISTS study_flags")
    if bind.dialect.name == "postgresql":
        op.drop_constraint(PK_NAME, "instances", type_="primary")
        op.create_primary_key(PK_NAME, "instances", columns)
    else:
        with op.batch_alter_table("instances", recreate="always", copy_from=_unkeyed_instances()) as batch:
            batch.create_primary_key(PK_NAME, columns)
    op.execute(_view_sql())


def upgrade() -> None:
    _set_primary_key(["study_instance_uid", "sop_instance_uid"])


def downgrade() -> None:
    shared = op.get_bind().execute(text(
        "SELECT COUNT(*) FROM (SELECT sop_instance_uid FROM instances GROUP BY sop_instance_uid"
        " HAVING COUNT(*) > 1) AS s")).scalar()
    if shared:
        raise RuntimeError(f"{shared} SOP Instance UID(s) have rows in more than one study; a downgrade would"
                           " have to drop rows (nothing was changed)")
    _set_primary_key(["sop_instance_uid"])
