"""Shared test helpers: the fixture corpus written by real DeepSpeed, and a CLI runner."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

FIXTURES = Path(__file__).parent / "fixtures"
ZERO = sorted(p.name for p in (FIXTURES / "zero").glob("*/facts.json") for p in [p.parent])
PIPE = sorted(p.name for p in (FIXTURES / "pipe").glob("*/facts.json") for p in [p.parent])


def facts(kind: str, name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / kind / name / "facts.json").read_text())


def ckpt(kind: str, name: str) -> Path:
    return FIXTURES / kind / name / "ckpt"


def tag_dir(kind: str, name: str) -> Path:
    return ckpt(kind, name) / facts(kind, name)["tag"]


class RunsAShellCommand:
    """Pickles as a call to os.system: what a malicious checkpoint would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def copy_fixture(tmp_path: Path):
    """Copy a fixture checkpoint into tmp_path so a test may damage it."""

    def copy(kind: str, name: str) -> Path:
        dest = tmp_path / name
        shutil.copytree(ckpt(kind, name), dest)
        return dest

    return copy


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch):
    """Run the dsckpt CLI in-process at a fixed width with colour off; returns the Result."""
    from dsckpt.cli.app import app

    monkeypatch.setenv("DSCKPT_WIDTH", "100")
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.delenv("DSCKPT_DEBUG", raising=False)
    runner = CliRunner()

    def run(*args: str | Path):
        return runner.invoke(app, [str(a) for a in args])

    return run
