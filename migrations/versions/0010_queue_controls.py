"""flow_controls: queue pause, concurrency and rate limits per queue and job type

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-28 11:45:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "flow_controls",
        sa.Column("scope", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("paused", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("limits_set", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("concurrency", sa.Integer(), nullable=True),
        sa.Column("rate_count", sa.Integer(), nullable=True),
        sa.Column("rate_period", sa.Integer(), nullable=True),
        sa.Column("burst", sa.Integer(), nullable=True),
        sa.Column("tokens", sa.Float(), nullable=True),
        sa.Column("refilled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint("scope IN ('queue', 'type')", name=op.f("ck_flow_controls_scope_valid")),
        sa.CheckConstraint(
            "scope = 'queue' OR NOT paused", name=op.f("ck_flow_controls_only_queues_pause")
        ),
        sa.CheckConstraint(
            "concurrency IS NULL OR concurrency >= 1",
            name=op.f("ck_flow_controls_concurrency_valid"),
        ),
        sa.CheckConstraint(
            "(rate_count IS NULL) = (rate_period IS NULL)"
            " AND (rate_count IS NULL OR rate_count >= 1)"
            " AND (rate_period IS NULL OR rate_period IN (1, 60, 3600))",
            name=op.f("ck_flow_controls_rate_valid"),
        ),
        sa.CheckConstraint(
            "burst IS NULL OR (burst >= 1 AND rate_count IS NOT NULL)",
            name=op.f("ck_flow_controls_burst_valid"),
        ),
        sa.PrimaryKeyConstraint("scope", "name", name=op.f("pk_flow_controls")),
    )


def downgrade() -> None:
    op.drop_table("flow_controls")
