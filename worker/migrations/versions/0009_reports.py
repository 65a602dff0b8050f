"""The DICOM SRs sent to a PACS, and the studies refused one: `reports`.

Why: `pneumonia-admin sr --send` sent a study's report and kept no trace of it. A site could not tell which
final studies still needed one (its shell loop over `--final-since` lost what a PACS outage refused), and a
changed result's report could not name the one it replaces (Predecessor Documents Sequence), so a reader saw
an old ROUTINE report beside a new URGENT one with nothing to say which is current. One row per study, PACS
and finalisation: the report sent (its UIDs), or why none could be made.

A new table, created in place: workers of 0008 keep running while this applies (they do not write it).

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "reports",
        sa.Column("study_instance_uid", sa.String(64), nullable=False),
        sa.Column("destination", sa.String(300), nullable=False),
        sa.Column("finalized_at", sa.DateTime, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("series_instance_uid", sa.String(64), nullable=True),
        sa.Column("sop_instance_uid", sa.String(64), nullable=True),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("recorded_at", sa.DateTime, nullable=False),
        sa.PrimaryKeyConstraint("study_instance_uid", "destination", "finalized_at", name="reports_pkey"),
    )


def downgrade() -> None:
    op.drop_table("reports")
