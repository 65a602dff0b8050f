"""Accession numbers an instance was re-sent under after its result was stored: `accession_aliases`.

Why: a PACS reconciling an order (a temporary accession number replaced) re-sends the image under the
corrected number. The first result is kept and was filed under the old number only, so `pneumonia-admin
list --accession` with the right number found nothing. Overwriting the stored number was no answer: a
stale re-send under the old number would move it back, and a prior re-sent under today's order would put
its flag on that order. Each number a re-send carries is recorded beside the result instead, and
`--accession` finds the result under any of them; the stored number stays the first.

A new table, created in place: workers of 0007 keep running while this applies (they do not write it).

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "accession_aliases",
        sa.Column("study_instance_uid", sa.String(64), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("accession_number", sa.String(64), nullable=False),
        sa.Column("first_seen_at", sa.DateTime, nullable=True),
        sa.PrimaryKeyConstraint("study_instance_uid", "sop_instance_uid", "accession_number",
                                name="accession_aliases_pkey"),
    )
    op.create_index("ix_accession_aliases_accession", "accession_aliases", ["accession_number"])


def downgrade() -> None:
    op.drop_index("ix_accession_aliases_accession", table_name="accession_aliases")
    op.drop_table("accession_aliases")
