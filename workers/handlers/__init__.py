"""Built-in job types. Importing this package registers them."""

from workers.handlers import demo, http

__all__ = ["demo", "http"]
