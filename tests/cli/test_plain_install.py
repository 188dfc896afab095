"""The CLI installed with a plain `pip install .` (no extras, no DeepSpeed) does on every fixture
exactly what it does in the dev environment: same exit codes, same output, same bytes. So does it
with numpy made unimportable (an install with `--no-deps`, torch's casts instead of numpy's), but
for Megatron checkpoints, whose numpy RNG states it then refuses in one line.

`make test` creates the plain environment (`.venv-plain`, see the Makefile) and points
DSCKPT_PLAIN_VENV at it, which makes its absence a failure; a bare `pytest` skips these tests when
the environment is missing and says how to make it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).parents[2]
DRIVER = Path(__file__).parent / "_plain_driver.py"
MAKE_IT = "make .venv-plain/.installed (or make test) creates it"


def _plain_python() -> Path:
    required = os.environ.get("DSCKPT_PLAIN_VENV")
    venv = Path(required) if required else ROOT / ".venv-plain"
    if not venv.is_absolute():
        venv = ROOT / venv
    python = venv / "bin" / "python"
    if not python.exists():
        if required:
            pytest.fail(f"DSCKPT_PLAIN_VENV={required} has no bin/python: {MAKE_IT}")
        pytest.skip(f"no plain-install environment at {venv}: {MAKE_IT}")
    return python


def _env(plain: bool, no_numpy: bool = False) -> dict[str, str]:
    drop = ("PYTHONPATH", "DSCKPT_DEBUG", "DSCKPT_DRIVER_NO_NUMPY")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(DSCKPT_WIDTH="300", NO_COLOR="1", PYTHONHASHSEED="0")  # no wrapped timings
    if not plain:
        env["PYTHONPATH"] = str(ROOT)
    if no_numpy:
        env["DSCKPT_DRIVER_NO_NUMPY"] = "1"
    return env


def _run_driver(
    python: Path | str, plain: bool, scratch: Path, no_numpy: bool = False
) -> dict[str, Any]:
    scratch.mkdir()
    (scratch / "tests").symlink_to(ROOT / "tests")
    out = subprocess.run(
        [str(python), str(DRIVER)],
        cwd=scratch,
        env=_env(plain, no_numpy),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """The driver's results in the dev environment (this interpreter, this tree), the plain
    install, and the plain install with numpy unimportable."""
    python = _plain_python()
    base = tmp_path_factory.mktemp("plain-install")
    return {
        "dev": _run_driver(sys.executable, False, base / "dev"),
        "plain": _run_driver(python, True, base / "plain"),
        "no-numpy": _run_driver(python, True, base / "no-numpy", no_numpy=True),
    }


def test_the_plain_environment_is_plain() -> None:
    python = _plain_python()
    code = (
        "import importlib.util as u, json, dsckpt, pathlib\n"
        "print(json.dumps({m: u.find_spec(m) is not None for m in ('numpy', 'deepspeed', "
        "'pytest')} | {'dsckpt': str(pathlib.Path(dsckpt.__file__).parent)}))"
    )
    out = subprocess.run(
        [str(python), "-c", code], cwd="/", env=_env(True), capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    assert found["numpy"] is True  # a dependency (pyproject.toml says why)
    assert found["deepspeed"] is False and found["pytest"] is False
    installed = Path(found["dsckpt"])
    assert installed.parent.name == "site-packages", installed  # a real install, not this tree
    # The installed copy is this tree's: otherwise the comparison below tests stale code.
    stale = [
        str(p.relative_to(ROOT))
        for p in sorted((ROOT / "dsckpt").rglob("*.py"))
        if not (installed / p.relative_to(ROOT / "dsckpt")).exists()
        or _sha(installed / p.relative_to(ROOT / "dsckpt")) != _sha(p)
    ]
    assert not stale, f"the plain install is older than {stale[:3]}: {MAKE_IT}"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _differences(want: dict[str, Any], got: dict[str, Any]) -> list[str]:
    assert want["results"].keys() == got["results"].keys()
    return [
        f"{cmd}: {key}: {got['results'][cmd][key]!r:.300} != {want['results'][cmd][key]!r:.300}"
        for cmd, expected in want["results"].items()
        for key in expected
        if got["results"][cmd][key] != expected[key]
    ]


def test_every_fixture_gives_the_same_results_in_both(runs) -> None:
    assert runs["dev"]["numpy"] is True and runs["plain"]["deepspeed"] is False
    differ = _differences(runs["dev"], runs["plain"])
    assert not differ, "\n".join(differ[:10])


def test_without_numpy_the_same_bytes_or_one_line(runs) -> None:
    """torch casts what numpy would, bit for bit; numpy values in a file are refused cleanly."""
    assert runs["no-numpy"]["numpy"] is False
    refused = []
    for cmd, got in runs["no-numpy"]["results"].items():
        want = runs["dev"]["results"][cmd]
        if got == want:
            continue
        # only Megatron files hold numpy: the pipeline fixtures and their universal conversion
        megatron = "fixtures/pipe/" in cmd or "fixtures/universal/u-p" in cmd
        assert megatron, f"{cmd}: {got!r:.600}"
        assert got["exit"] == 1 and got["exception"] is None and got["files"] == {}, cmd
        lines = [x for x in got["stderr"].splitlines() if not x.startswith("warning: ")]
        assert len(lines) == 1 and "numpy is not installed: pip install numpy" in lines[0], cmd
        refused.append(cmd)
    kept = [c for c in runs["dev"]["results"] if c not in refused and "fixtures/zero/" in c]
    assert len(kept) >= 23 * 9, len(kept)  # every ZeRO fixture, every command, the same


def test_the_corpus_was_really_converted(runs) -> None:
    """Guards the comparison against both environments failing the same way."""
    results = runs["dev"]["results"]
    assert all(r["exception"] is None for r in results.values()), [
        (c, r["exception"]) for c, r in results.items() if r["exception"]
    ]
    ok = {c for c, r in results.items() if r["exit"] == 0}
    converted = [c for c in ok if c.startswith("to-fp32") and results[c]["files"]]
    assert len(converted) >= 4 * 33, len(converted)  # every fixture, every format
    assert any(c.startswith("reshape") and "--dp 3" in c for c in ok)
    assert any(c.startswith("reshape") and "--tp 1" in c for c in ok)
    assert any(c.startswith("reshape") and "--ep 1" in c and results[c]["files"] for c in ok)
    for c in ok:
        if c.startswith(("inspect", "show-map")) and "--json" not in c:
            assert results[c]["stdout"].strip(), c


def test_the_console_script_runs_without_numpy(tmp_path: Path) -> None:
    """The `dsckpt` entry point of the plain install, on a bf16 checkpoint (the cast path)."""
    python = _plain_python()
    out_file = tmp_path / "model.safetensors"
    src = ROOT / "tests/fixtures/zero/z2-bf16-dp2/ckpt"
    done = subprocess.run(
        [str(python.with_name("dsckpt")), "to-fp32", str(src), str(out_file), "--dtype", "bf16"],
        env=_env(True),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("wrote ") and done.stderr == ""
    assert out_file.stat().st_size > 0
