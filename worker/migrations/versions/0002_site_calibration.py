"""Record which site calibration (if any) produced each result.

A site calibration replaces the card's temperature, threshold and strata, so a result
is reproducible only with the model sha256 and the calibration sha256 together.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("instances", sa.Column("site_calibration_sha256", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("site_calibration_sha256")
