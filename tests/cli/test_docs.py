"""Every command shown in README.md and docs/ runs, and shown output is exactly what it prints.

The console blocks in the docs are the golden files of `inspect` and `show-map` at 100 columns:
when the output changes on purpose, regenerate every block with `python tests/cli/test_docs.py`
(it runs each shown command at 100 columns and writes its output under it; review the diff),
and `docs/cli.md` with `typer dsckpt.cli.app utils docs --name dsckpt --output docs/cli.md`.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
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
        # The `typer` script imports the installed dsckpt, which may be another checkout's
        # (an editable install): put the tree under test first.
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.read_text() == GENERATED.read_text(), (
        "docs/cli.md is stale: typer dsckpt.cli.app utils docs --name dsckpt --output docs/cli.md"
    )


def regenerate() -> None:
    """Rewrite the shown output under each `$ dsckpt ...` line of the docs with what it prints
    now (blocks that show no output stay so), running in a scratch directory as the test does."""
    import tempfile

    env = {**os.environ, "DSCKPT_WIDTH": "100", "PYTHONPATH": str(ROOT)}  # this tree
    dsckpt = Path(sys.executable).with_name("dsckpt")

    def segment(lines: list[str]) -> list[str]:
        if not lines[0].startswith("$ dsckpt ") or not "".join(lines[1:]).strip():
            return lines
        command = shlex.split(lines[0])[2:]
        scratch = Path(tempfile.mkdtemp())  # each command in its own directory, as in the test
        (scratch / "tests").symlink_to(ROOT / "tests")
        run = subprocess.run(
            [str(dsckpt), *command], cwd=scratch, env=env, capture_output=True, text=True
        )
        return [lines[0], *(x.rstrip() for x in run.stdout.rstrip("\n").splitlines())]

    def block(match: re.Match[str]) -> str:
        segments: list[list[str]] = []
        for line in match.group(1).rstrip("\n").split("\n"):
            if line.startswith("$ ") or not segments:
                segments.append([line])
            else:
                segments[-1].append(line)
        lines = [x for seg in segments for x in segment(seg)]
        return "```console\n" + "\n".join(lines) + "\n```"

    for doc in DOCS:
        if doc != GENERATED:
            text = doc.read_text()
            new = re.sub(r"```console\n(.*?)```", block, text, flags=re.S)
            if new != text:
                doc.write_text(new)
                print(f"regenerated {doc.relative_to(ROOT)}")


if __name__ == "__main__":
    regenerate()
