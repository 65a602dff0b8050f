"""Count on the row the claims whose delivery failed transiently, not only in the Celery message.

Why: `attempts` counts claims, and a claim whose delivery then failed transiently (the database
refused the result, the spool mount went stale) is not a lost delivery. That count travelled in
the Celery message alone (`retries_after_claim`), so when a retry chain ran out and the gateway's
sweep re-sent the instance as a new message, or when two messages for the same instance failed
side by side (a gateway restart re-sends what is pending), the failed claims read as lost
deliveries and the instance was failed "abandoned" without being scored. `transient_claims` is
counted by every such delivery while the database answers (`db.credit_failed_claim`).

The column is nullable and added in place: workers of the previous version keep running during
the upgrade (they neither write nor read it).

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
    op.add_column("instances", sa.Column("transient_claims", sa.Integer, nullable=True))


def downgrade() -> None:
    # In place, as 0002's downgrade: a batch copy would rename a table that the study_flags view names.
    op.drop_column("instances", "transient_claims")
