"""The study_flags view also counts a study's failed and skipped images.

Why: the study worklist (`pneumonia-admin list --studies`, `show`) gave `n_instances`, `n_done` and
`n_pending` only, so a study whose frontal image failed (unreadable, blank) read like one whose
extra image was a skipped lateral, and a study whose every image failed read "final, no flag"
with nothing to say it was never scored.

PostgreSQL replaces the view in place (`CREATE OR REPLACE VIEW` may append columns), so grants and
views a site built on it stay; SQLite has neither and recreates it.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

STUDY_FLAGS_COLUMNS = """
    s.study_instance_uid,
    s.accession_number,
    s.final,
    s.finalized_at,
    s.first_received_at,
    s.last_received_at,
    s.flag,
    s.stratum,
    s.max_probability,
    (SELECT COUNT(*) FROM instances i WHERE i.study_instance_uid = s.study_instance_uid) AS n_instances,
    (SELECT COALESCE(SUM(CASE WHEN i.status = 'done' THEN 1 ELSE 0 END), 0) FROM instances i
      WHERE i.study_instance_uid = s.study_instance_uid) AS n_done,
    (SELECT COALESCE(SUM(CASE WHEN i.status IN ('queued', 'processing') THEN 1 ELSE 0 END), 0) FROM instances i
      WHERE i.study_instance_uid = s.study_instance_uid) AS n_pending"""

FAILURE_COLUMNS = """,
    (SELECT COALESCE(SUM(CASE WHEN i.status = 'failed' THEN 1 ELSE 0 END), 0) FROM instances i
      WHERE i.study_instance_uid = s.study_instance_uid) AS n_failed,
    (SELECT COALESCE(SUM(CASE WHEN i.status = 'skipped' THEN 1 ELSE 0 END), 0) FROM instances i
      WHERE i.study_instance_uid = s.study_instance_uid) AS n_skipped"""


def _view(columns: str, replace: bool) -> str:
    return f"CREATE {'OR REPLACE ' if replace else ''}VIEW study_flags AS\nSELECT{columns}\nFROM studies s\n"


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_view(STUDY_FLAGS_COLUMNS + FAILURE_COLUMNS, replace=True))
        return
    op.execute("DROP VIEW IF EXISTS study_flags")
    op.execute(_view(STUDY_FLAGS_COLUMNS + FAILURE_COLUMNS, replace=False))


def downgrade() -> None:
    # PostgreSQL cannot drop columns from a view in place: recreated (a site's views on it must go first)
    op.execute("DROP VIEW IF EXISTS study_flags")
    op.execute(_view(STUDY_FLAGS_COLUMNS, replace=False))
