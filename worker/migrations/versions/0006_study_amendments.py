"""A study keeps what it was when a late image reopened it; `finalized_at` is indexed.

Why: a study final and ROUTINE that a late image reopened and that went final again as URGENT
showed only its new state: `reopen_study` cleared `finalized_at`, and nothing said that a
radiologist may already have read it from the ROUTINE list. `reopened_count` counts the reopenings,
`flag_before_reopen` is the flag the study had when it was last reopened (the one a reader may have
seen as final), `first_finalized_at` the first time it went final (never cleared). The index on
`finalized_at` serves `pneumonia-admin list/export --studies --final-since`, the RIS's poll.

Columns are added in place (`reopened_count` with a server default of 0), so workers of 0005 keep
running while this applies. The study_flags view gains the three columns: PostgreSQL appends them in
place (grants and a site's views on it stay), SQLite recreates it.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import importlib

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_previous = importlib.import_module("worker.migrations.versions.0005_study_failures")
AMENDMENT_COLUMNS = """,
    s.reopened_count,
    s.flag_before_reopen,
    s.first_finalized_at"""
FLAG_MAX_LENGTH = 32


def _columns(amended: bool) -> str:
    return _previous.STUDY_FLAGS_COLUMNS + _previous.FAILURE_COLUMNS + (AMENDMENT_COLUMNS if amended else "")


def upgrade() -> None:
    op.add_column("studies", sa.Column("reopened_count", sa.Integer, nullable=False, server_default="0"))
    op.add_column("studies", sa.Column("flag_before_reopen", sa.String(FLAG_MAX_LENGTH), nullable=True))
    op.add_column("studies", sa.Column("first_finalized_at", sa.DateTime, nullable=True))
    op.execute("UPDATE studies SET first_finalized_at = finalized_at WHERE finalized_at IS NOT NULL")
    op.create_index("ix_studies_finalized", "studies", ["finalized_at"])
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_previous._view(_columns(amended=True), replace=True))
        return
    op.execute("DROP VIEW IF EXISTS study_flags")
    op.execute(_previous._view(_columns(amended=True), replace=False))


def downgrade() -> None:
    # PostgreSQL cannot drop columns from a view in place: recreated (a site's views on it must go first)
    op.execute("DROP VIEW IF EXISTS study_flags")
    op.execute(_previous._view(_columns(amended=False), replace=False))
    op.drop_index("ix_studies_finalized", table_name="studies")
    # In place, as 0004's downgrade: a batch copy would rename a table that the study_flags view names.
    for column in ("first_finalized_at", "flag_before_reopen", "reopened_count"):
        op.drop_column("studies", column)
