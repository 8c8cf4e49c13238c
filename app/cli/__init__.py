"""The ``conveyor`` command: ``main`` parses and runs; ``operator_commands`` talks to the API."""

from app.cli.main import main

__all__ = ["main"]
