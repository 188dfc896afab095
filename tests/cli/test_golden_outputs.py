"""Golden digests: every output byte of every command on every fixture stays what it was.

Refactors must not change a single output byte. For each fixture this runs to-fp32 in each
format and reshape to a few targets, hashes every file written (relative path -> sha256), and
compares with ``tests/golden/outputs.json``. A command that refuses a fixture records the error
class instead, so a refusal that starts or stops is caught too.

Regenerate (only when an output change is intended, and say why in the commit)::

    python tests/cli/test_golden_outputs.py --update
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

FIXTURES = Path(__file__).parents[1] / "fixtures"
GOLDEN = Path(__file__).parents[1] / "golden" / "outputs.json"


def _fixtures() -> list[tuple[str, str]]:
    return sorted(
        (kind, p.parent.name)
        for kind in ("zero", "pipe")
        for p in (FIXTURES / kind).glob("*/facts.json")
    )


def _jobs(kind: str, name: str) -> dict[str, Callable[[Path, Path], Any]]:
    """The commands run on one fixture: job name -> call(ckpt, out)."""
    import dsckpt

    facts = json.loads((FIXTURES / kind / name / "facts.json").read_text())
    dp = int(facts["dp"])
    jobs: dict[str, Callable[[Path, Path], Any]] = {
        "to-fp32.safetensors": lambda c, o: dsckpt.consolidate(c, o / "model.safetensors"),
        "to-fp32.bin": lambda c, o: dsckpt.consolidate(c, o / "model.bin"),
        "to-fp32.shards": lambda c, o: dsckpt.consolidate(c, o / "hf", max_shard_size="2KB"),
        "to-fp32.bf16": lambda c, o: dsckpt.consolidate(c, o / "model.safetensors", dtype="bf16"),
    }
    if kind == "zero":
        jobs[f"reshape.dp{dp + 1}"] = lambda c, o: dsckpt.reshape(c, o / "r", dp=dp + 1)
        jobs["reshape.dp1"] = lambda c, o: dsckpt.reshape(c, o / "r", dp=1)
    else:
        jobs["to-fp32.from-layers"] = lambda c, o: dsckpt.consolidate(
            c, o / "model.safetensors", from_layers=True
        )
        jobs["reshape.t1p1d1"] = lambda c, o: dsckpt.reshape(c, o / "r", tp=1, pp=1, dp=1)
        jobs["reshape.t2p2d1"] = lambda c, o: dsckpt.reshape(c, o / "r", tp=2, pp=2, dp=1)
    return jobs


def _digest_tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _run(kind: str, name: str) -> dict[str, Any]:
    """Every job's outcome on one fixture: file digests, or ``error: <class>``."""
    from dsckpt.errors import DsckptError

    ckpt = FIXTURES / kind / name / "ckpt"
    outcome: dict[str, Any] = {}
    for job, call in _jobs(kind, name).items():
        out = Path(tempfile.mkdtemp(prefix="dsckpt-golden-"))
        try:
            call(ckpt, out)
            outcome[job] = _digest_tree(out)
        except DsckptError as exc:
            outcome[job] = f"error: {type(exc).__name__}"
        finally:
            shutil.rmtree(out, ignore_errors=True)
    return outcome


@pytest.mark.parametrize(("kind", "name"), _fixtures(), ids=lambda v: str(v))
def test_outputs_match_golden_digests(kind: str, name: str) -> None:
    golden = json.loads(GOLDEN.read_text())
    expected = golden[f"{kind}/{name}"]
    actual = _run(kind, name)
    changed = [
        job for job in sorted(set(expected) | set(actual)) if expected.get(job) != actual.get(job)
    ]
    assert not changed, f"outputs changed for {kind}/{name}: {changed}"


def _update() -> None:
    golden = {f"{kind}/{name}": _run(kind, name) for kind, name in _fixtures()}
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}: {len(golden)} fixtures")


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        sys.exit("usage: python tests/cli/test_golden_outputs.py --update")
    _update()
