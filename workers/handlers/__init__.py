"""Built-in job types. Importing this package registers them."""

from workers.handlers import demo

__all__ = ["demo"]
