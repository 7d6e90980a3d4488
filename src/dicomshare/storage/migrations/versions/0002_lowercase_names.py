"""Lower-cased person names, so case-insensitive PN matching can use an index.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("study") as batch:
        batch.add_column(sa.Column("patient_name_lc", sa.Text(), nullable=True))
        batch.add_column(sa.Column("referring_physician_name_lc", sa.Text(), nullable=True))
    # dicomshare registers a Unicode-aware lower() on SQLite connections; PostgreSQL has one.
    op.execute("UPDATE study SET patient_name_lc = lower(patient_name), "
               "referring_physician_name_lc = lower(referring_physician_name)")
    op.create_index("ix_study_patient_name_lc", "study", ["patient_name_lc"],
                    postgresql_ops={"patient_name_lc": "text_pattern_ops"})


def downgrade() -> None:
    op.drop_index("ix_study_patient_name_lc", table_name="study")
    with op.batch_alter_table("study") as batch:
        batch.drop_column("referring_physician_name_lc")
        batch.drop_column("patient_name_lc")
