"""When `pneumonia-admin reprocess` last sent an instance again: `instances.requeued_at`.

Why: a reprocessed row keeps its `received_at` (the image's arrival, which the worklist and the RIS
sort by), so `stats` measured its latency from that first arrival: one image reprocessed after a
policy change weeks later put weeks into the window's p99 and max, and the PACS admin reading them
saw a worker that had fallen weeks behind. `stats` now measures such a row from `requeued_at` and
counts them apart; the column also keeps the fact of the reprocessing on the row once its result
replaces the reprocessing note.

Nullable and added in place: workers of 0006 keep running while this applies (they neither write
nor read it).

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("instances", sa.Column("requeued_at", sa.DateTime, nullable=True))


def downgrade() -> None:
    # In place, as 0004's downgrade: a batch copy would rename a table that the study_flags view names.
    op.drop_column("instances", "requeued_at")
