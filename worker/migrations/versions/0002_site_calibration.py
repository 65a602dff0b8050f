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
    # A plain DROP COLUMN (PostgreSQL; SQLite since 3.35): a batch copy of the table would rename the
    # copy into place, which modern SQLite refuses while the study_flags view names `instances`,
    # and it would leave its half-made copy behind for the next attempt to fail on.
    op.drop_column("instances", "site_calibration_sha256")
