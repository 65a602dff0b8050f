"""Keep each delivery's count of transient retries after a claim on the row, not only in its message.

Why: `attempts` counts claims, and a claim whose delivery then failed transiently (the database
went away while storing) is not a lost delivery. That correction travelled in the Celery message
alone (`retries_after_claim`), so when a retry chain ran out and the gateway's sweep re-sent the
instance as a new message, the chain's claims were counted as lost deliveries and the instance was
failed "abandoned" without being scored. The row now records the task id whose correction it has
applied and how much of it (`credited_delivery`, `credited_retries`), so a claim applies only what
that delivery has not applied yet: a redelivery of the same message (its worker died) counts, a
retry of it does not, and a new message starts from what is stored.

Both columns are nullable and added in place: workers of the previous version keep running
during the upgrade (they do not write them).

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
    op.add_column("instances", sa.Column("credited_delivery", sa.String(64), nullable=True))
    op.add_column("instances", sa.Column("credited_retries", sa.Integer, nullable=True))


def downgrade() -> None:
    # In place, as 0002's downgrade: a batch copy would rename a table that the study_flags view names.
    op.drop_column("instances", "credited_retries")
    op.drop_column("instances", "credited_delivery")
