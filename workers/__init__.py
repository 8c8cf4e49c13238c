"""Conveyor worker processes: ``python -m workers`` or ``conveyor worker``."""
