"""Every command shown in README.md and docs/ runs, and shown output is exactly what it prints.

The console blocks in the docs are the golden files of `inspect` and `show-map` at 100 columns:
when the output changes on purpose, regenerate a block with the command it shows, e.g.
`DSCKPT_WIDTH=100 dsckpt show-map tests/fixtures/pipe/p2t2d2-z1-fp32/ckpt --tp 1 --pp 3 --dp 2`,
and `docs/cli.md` with `typer dsckpt.cli.app utils docs --name dsckpt --output docs/cli.md`.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
GENERATED = ROOT / "docs" / "cli.md"


def _examples() -> list[tuple[str, str, str]]:
    """(doc, command, shown output) for each `$ dsckpt ...` line in a console block."""
    found = []
    for doc in DOCS:
        if doc == GENERATED:
            continue
        for block in re.findall(r"```console\n(.*?)```", doc.read_text(), re.S):
            lines = block.splitlines()
            for i, line in enumerate(lines):
                if line.startswith("$ dsckpt "):
                    output = []
                    for follow in lines[i + 1 :]:
                        if follow.startswith("$ "):
                            break
                        output.append(follow)
                    found.append((doc.name, line[2:], "\n".join(output)))
    return found


EXAMPLES = _examples()


def test_the_docs_have_examples() -> None:
    assert len(EXAMPLES) >= 8


@pytest.mark.parametrize(
    "doc,command,shown", EXAMPLES, ids=[f"{d}:{c[7:40]}" for d, c, _ in EXAMPLES]
)
def test_documented_command_runs(
    cli, tmp_path: Path, monkeypatch, doc: str, command: str, shown: str
) -> None:
    (tmp_path / "tests").symlink_to(ROOT / "tests")
    monkeypatch.chdir(tmp_path)
    result = cli(*shlex.split(command)[1:])
    assert result.exit_code == 0, f"{doc}: {command}\n{result.output}"
    if shown.strip():
        got = [line.rstrip() for line in result.stdout.strip("\n").splitlines()]
        want = [line.rstrip() for line in shown.strip("\n").splitlines()]
        assert got == want, f"{doc}: the output of `{command}` changed; regenerate the block"


def test_cli_reference_is_generated_from_the_app(tmp_path: Path) -> None:
    typer_cli = Path(sys.executable).with_name("typer")
    out = tmp_path / "cli.md"
    subprocess.run(
        [
            str(typer_cli),
            "dsckpt.cli.app",
            "utils",
            "docs",
            "--name",
            "dsckpt",
            "--output",
            str(out),
        ],
        check=True,
        capture_output=True,
        cwd=ROOT,
    )
    assert out.read_text() == GENERATED.read_text(), (
        "docs/cli.md is stale: typer dsckpt.cli.app utils docs --name dsckpt --output docs/cli.md"
    )
