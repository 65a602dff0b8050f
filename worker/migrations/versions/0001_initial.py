"""Initial schema: instances, studies (with the study-level flag) and the study_flags view.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Counts filter on the study only (CASE inside SUM) so every planner uses the study index.
STUDY_FLAGS_VIEW = """
CREATE VIEW study_flags AS
SELECT
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
      WHERE i.study_instance_uid = s.study_instance_uid) AS n_pending
FROM studies s
"""


def upgrade() -> None:
    op.create_table(
        "instances",
        sa.Column("sop_instance_uid", sa.String(64), primary_key=True),
        sa.Column("study_instance_uid", sa.String(64), nullable=False),
        sa.Column("series_instance_uid", sa.String(64)),
        sa.Column("accession_number", sa.String(64)),
        sa.Column("modality", sa.String(16)),
        sa.Column("spool_relpath", sa.String(300)),
        sa.Column("model_name", sa.String(100)),
        sa.Column("model_version", sa.String(50)),
        sa.Column("model_sha256", sa.String(64)),
        sa.Column("probability", sa.Float),
        sa.Column("prediction", sa.String(32)),
        sa.Column("stratum", sa.String(32)),
        sa.Column("severity", sa.Integer),
        sa.Column("flag", sa.String(32)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("received_at", sa.DateTime),
        sa.Column("started_at", sa.DateTime),
        sa.Column("finished_at", sa.DateTime),
        sa.Column("processing_ms", sa.Float),
    )
    op.create_index("ix_instances_study_received", "instances", ["study_instance_uid", "received_at"])
    op.create_index("ix_instances_accession", "instances", ["accession_number"])
    op.create_index("ix_instances_status_finished", "instances", ["status", "finished_at"])
    op.create_index("ix_instances_stratum", "instances", ["stratum"])
    op.create_index("ix_instances_flag", "instances", ["flag"])
    op.create_index("ix_instances_received", "instances", ["received_at"])
    op.create_index("ix_instances_finished", "instances", ["finished_at"])
    op.create_table(
        "studies",
        sa.Column("study_instance_uid", sa.String(64), primary_key=True),
        sa.Column("accession_number", sa.String(64)),
        sa.Column("first_received_at", sa.DateTime),
        sa.Column("last_received_at", sa.DateTime),
        sa.Column("final", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("finalized_at", sa.DateTime),
        sa.Column("severity", sa.Integer),
        sa.Column("flag", sa.String(32)),
        sa.Column("stratum", sa.String(32)),
        sa.Column("max_probability", sa.Float),
    )
    op.create_index("ix_studies_accession", "studies", ["accession_number"])
    op.create_index("ix_studies_last_received", "studies", ["last_received_at"])
    op.create_index("ix_studies_flag_received", "studies", ["flag", "last_received_at"])
    op.create_index("ix_studies_stratum_received", "studies", ["stratum", "last_received_at"])
    op.execute(STUDY_FLAGS_VIEW)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS study_flags")
    op.drop_table("studies")
    op.drop_table("instances")
