"""README.md tells the truth: its commands are what CI runs; its configuration table is whole."""

from __future__ import annotations

import os
import re
from pathlib import Path

from pydantic import BaseModel

from app.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.M | re.S)
    assert match, f"README.md has no '## {title}' section"
    return match.group(1)


def _first_block(text: str) -> list[str]:
    match = re.search(r"```(?:sh|bash)?\n(.*?)```", text, re.S)
    assert match, "no code block"
    return [line.strip() for line in match.group(1).splitlines() if line.strip()]


def _commands(script: Path) -> list[str]:
    """The script's lines that are not blank or comments."""
    lines = []
    for raw in script.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def test_run_command_installs_and_starts_conveyor_dev() -> None:
    assert _first_block(_section("Run it")) == ["pip install -e . && conveyor dev"]
    scripts = (ROOT / "pyproject.toml").read_text()
    assert 'conveyor = "app.cli:main"' in scripts  # `conveyor` is the package's console script


def test_test_command_is_what_ci_runs() -> None:
    [command] = _first_block(_section("Test it"))
    ci = _commands(ROOT / ".ci" / "run")
    assert ci[-1] == command, "the last command of .ci/run must be the README's test command"
    script = ROOT / command
    assert script.is_file() and os.access(script, os.X_OK)
    body = script.read_text()
    for step in ("pip install", "scripts/check", "pytest"):
        assert step in body, f"{command} does not run {step}"
    check = (ROOT / "scripts" / "check").read_text()
    for tool in ("ruff format --check", "ruff check", "mypy"):
        assert tool in check, f"scripts/check does not run {tool}"


def _config_rows() -> dict[str, str]:
    """``CONVEYOR_*`` name → default cell, from the tables of the Configuration section."""
    rows: dict[str, str] = {}
    for line in _section("Configuration").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and (name := re.fullmatch(r"`(CONVEYOR_[A-Z0-9_]+)`", cells[0])):
            rows[name.group(1)] = cells[1]
    return rows


def _env_names(settings: type[BaseModel]) -> dict[str, object]:
    return {f"CONVEYOR_{name.upper()}": f.default for name, f in settings.model_fields.items()}


def test_configuration_table_lists_every_setting_and_nothing_else() -> None:
    rows, settings = _config_rows(), _env_names(Settings)
    assert sorted(set(settings) - set(rows)) == [], "settings missing from README's table"
    assert sorted(set(rows) - set(settings)) == [], "README documents unknown settings"


def _matches(default: object, cell: str) -> bool:
    token = re.search(r"`([^`]*)`", cell)
    if default is None:
        return True  # "unset" is written in words
    if isinstance(default, bool):
        return token is not None and token.group(1) == str(default).lower()
    if isinstance(default, int | float):
        return token is not None and float(token.group(1)) == float(default)
    if default == "":
        return token is None or token.group(1) == ""
    return token is not None and token.group(1) == default


def test_configuration_defaults_match_the_code() -> None:
    rows = _config_rows()
    wrong = {
        name: (rows[name], default)
        for name, default in _env_names(Settings).items()
        if name in rows and not _matches(default, rows[name])
    }
    assert wrong == {}, "README default differs from app/settings.py"


def test_curl_example_submits_demo_echo_and_waits_for_it() -> None:
    section = _section("Submit a job and watch it")
    assert re.search(r"curl .*http://127\.0\.0\.1:8000/v1/jobs", section)
    assert '"type": "demo.echo"' in section
    assert re.search(r"curl .*/v1/jobs/\$id\?wait=", section)
    assert re.search(r"curl .*/v1/jobs/\$id/events\?follow=true", section)


def test_relative_links_point_at_files() -> None:
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
    missing = [link for link in links if "://" not in link and not (ROOT / link).exists()]
    assert missing == []
