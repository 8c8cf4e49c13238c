"""Which modules register job types: the built-in ones always, then the configured ones."""

from __future__ import annotations

import ast
import inspect

from app.jobs import registry
from app.jobs.registry import load_handlers
from app.settings import BUILTIN_HANDLER_MODULES, Settings


def test_builtin_handlers_come_first_and_once_whatever_is_configured() -> None:
    assert Settings(handler_modules="").handler_module_list == list(BUILTIN_HANDLER_MODULES)
    configured = Settings(handler_modules="tests.support.handlers, workers.handlers")
    assert configured.handler_module_list == [*BUILTIN_HANDLER_MODULES, "tests.support.handlers"]


def test_loading_a_user_module_keeps_the_builtin_types() -> None:
    loaded = load_handlers(Settings(handler_modules="tests.support.handlers").handler_module_list)
    names = {t.name for t in loaded.all()}
    assert {"demo.echo", "demo.sleep", "demo.fail", "http.request"} <= names
    assert "test.effect" in names


def test_the_registry_names_no_handler_package() -> None:
    """Imports flow workers -> app.jobs: the registry imports what it is given, nothing else."""
    tree = ast.parse(inspect.getsource(registry))
    strings = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)]
    imports = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [s for s in strings if isinstance(s, str) and s.startswith("workers")]
    assert all(not (i.module or "").startswith("workers") for i in imports)
