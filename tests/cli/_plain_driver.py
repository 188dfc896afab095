"""Run the dsckpt CLI over every fixture and print what it did, as JSON, for comparing two
environments (tests/cli/test_plain_install.py): the dev one and a plain `pip install .`.

Run with the current directory a scratch directory holding a `tests` symlink to the repository's
tests, so every path printed is relative and the same in both runs. Each command runs in-process
(one interpreter start for the whole corpus keeps this to seconds); the result of each is its exit
code, stdout, stderr (timings masked) and the SHA-256 of every file it wrote. With
DSCKPT_DRIVER_NO_NUMPY=1, numpy cannot be imported (the torch-only paths).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path

if os.environ.get("DSCKPT_DRIVER_NO_NUMPY"):
    # As an install without numpy (`pip install --no-deps`): every `import numpy` fails, torch's
    # own included.
    sys.modules["numpy"] = None  # type: ignore[assignment]

from typer.testing import CliRunner  # noqa: E402

from dsckpt.cli.app import app  # noqa: E402

FIXTURES = Path("tests/fixtures")
TIMING = re.compile(r"\d+(\.\d+)?\s+s\b")


def commands(kind: str, name: str, facts: dict) -> list[list[str]]:
    src = str(FIXTURES / kind / name / "ckpt")
    out = f"out/{kind}/{name}"
    runs = [
        ["inspect", src],
        ["inspect", src, "--params", "--json"],
        ["show-map", src],
        ["show-map", src, "--json"],
        ["to-fp32", src, f"{out}/model.safetensors"],
        ["to-fp32", src, f"{out}/model.bin"],
        ["to-fp32", src, f"{out}/shards", "--max-shard-size", "2KB"],
        ["to-fp32", src, f"{out}/model-bf16.safetensors", "--dtype", "bf16"],
    ]
    if kind == "zero":
        runs.append(["reshape", src, f"{out}/dp3", "--dp", "3"])
    else:
        runs.append(["to-fp32", src, f"{out}/layers.safetensors", "--from-layers"])
        runs.append(["reshape", src, f"{out}/tp1pp1", "--tp", "1", "--pp", "1", "--dp", "1"])
    if kind == "moe":  # DP 4 is a multiple of every fixture's EP sizes; --ep keeps the DP
        runs.append(["reshape", src, f"{out}/dp4", "--dp", "4"])
        runs.append(["reshape", src, f"{out}/ep1", "--ep", "1"])
    return runs


def digest(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def main() -> None:
    runner = CliRunner()
    results: dict[str, dict] = {}
    for facts_file in sorted(FIXTURES.glob("*/*/facts.json")):
        kind, name = facts_file.parent.parent.name, facts_file.parent.name
        facts = json.loads(facts_file.read_text())
        for args in commands(kind, name, facts):
            written = Path(args[2]) if args[0] in ("to-fp32", "reshape") else None
            result = runner.invoke(app, args)
            results[" ".join(args)] = {
                "exit": result.exit_code,
                "stdout": TIMING.sub("T s", result.stdout),
                "stderr": TIMING.sub("T s", result.stderr),
                "exception": None
                if result.exception is None or isinstance(result.exception, SystemExit)
                else repr(result.exception),
                "files": digest(written) if written is not None else {},
            }
    json.dump(
        {
            "numpy": sys.modules.get("numpy") is not None,
            "deepspeed": "deepspeed" in sys.modules,
            "dsckpt": str(Path(sys.modules["dsckpt"].__file__ or "").parent),
            "results": results,
        },
        sys.stdout,
        indent=1,
    )


if __name__ == "__main__":
    main()
