"""Record which delivery holds an instance's claim (its Celery task id).

Why: a delivery that finds the instance claimed less than the hard time limit ago waits for that
claim instead of claiming over it (a re-send, a requeue or the sweep after a gateway restart sent
a second message while the first still ran). But when a pool process dies, Celery re-queues its
message at once, with the same task id; without the id that redelivery waited for its own dead
claim for up to TRIAGE_TIME_LIMIT_S. With it, a claim held by the same task id is the dead
delivery's (a message is with one consumer at a time, and Celery's retries keep the id), so the
redelivery claims at once and the death still counts as a lost delivery.

The column is nullable and added in place, as 0004's: workers of the previous version keep
running during the upgrade (they neither write nor read it).

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("instances", sa.Column("claim_id", sa.String(64), nullable=True))


def downgrade() -> None:
    # In place, as 0002's and 0004's: a batch copy would rename a table that the study_flags view names.
    op.drop_column("instances", "claim_id")
