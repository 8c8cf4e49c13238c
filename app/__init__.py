"""Conveyor: an HTTP job queue with PostgreSQL as the record and Redis Streams for delivery."""

from app.errors import PermanentError

__all__ = ["PermanentError"]
