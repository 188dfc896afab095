"""The layers of docs/architecture.md hold: imports point down, and modules import at the top.

The contract itself lives in pyproject.toml (``[tool.importlinter]``); this runs it, checks it
covers every package, and shows it fails on an upward import. Top-of-module imports keep the
graph honest: an import hidden in a function is a dependency the contract can still see, but a
reader cannot, and it is how import circles were papered over.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "dsckpt"
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]


def _lint(config: Path, cwd: Path = ROOT, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(config), "--no-cache"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        **kwargs,
    )


def test_the_layer_contract_is_kept() -> None:
    result = _lint(ROOT / "pyproject.toml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BROKEN" not in result.stdout


def test_every_module_is_in_a_layer() -> None:
    """A new top-level package or module must be placed in the layers, or it escapes the rule."""
    (contract,) = [c for c in _config()["contracts"] if c["id"] == "layers"]
    placed = {name.strip(" ()") for layer in contract["layers"] for name in layer.split("|")}
    top = {
        f"dsckpt.{p.stem if p.is_file() else p.name}"
        for p in PACKAGE.iterdir()
        if (p.suffix == ".py" and not p.stem.startswith("_"))
        or (p.is_dir() and (p / "__init__.py").exists())
    }
    assert top - placed == set(), "add these to [tool.importlinter] layers in pyproject.toml"


@pytest.mark.parametrize(
    "module,line,broken",
    [
        (
            "io/regular.py",
            "from dsckpt.cli import app",
            "dsckpt.io is not allowed to import dsckpt.cli",
        ),
        ("plan/maps.py", "import numpy", "dsckpt.plan.maps is not allowed to import numpy"),
        (
            "api/reshaping.py",
            "from dsckpt.api import consolidation",
            "dsckpt.api.reshaping is not allowed to import dsckpt.api.consolidation",
        ),
    ],
)
def test_a_violation_breaks_the_contract(
    tmp_path: Path, module: str, line: str, broken: str
) -> None:
    """The checks can fail: the same contracts over a copy of the package with one bad import
    (upward, impure arithmetic, front doors tied together) report it."""
    copy = tmp_path / "src"
    shutil.copytree(PACKAGE, copy / "dsckpt", ignore=shutil.ignore_patterns("__pycache__"))
    bad = copy / "dsckpt" / module
    bad.write_text(bad.read_text() + f"\n{line}  # noqa\n")
    config = tmp_path / "pyproject.toml"
    config.write_text((ROOT / "pyproject.toml").read_text())
    result = _lint(config, tmp_path, env={"PYTHONPATH": str(copy), "PATH": "/usr/bin:/bin"})
    assert result.returncode != 0, result.stdout
    assert broken in " ".join(result.stdout.split())


def test_the_architecture_doc_names_real_modules() -> None:
    """docs/architecture.md stays true: every module path it names exists."""
    doc = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"dsckpt/[\w/]+(?:\.py|\.json|/)", doc))
    assert len(named) > 20
    assert sorted(n for n in named if not (ROOT / n).exists()) == []


def test_the_architecture_doc_example_is_the_plan() -> None:
    """The worked example's reads are what the planner makes for that fixture."""
    from dsckpt.discover.layout import open_checkpoint
    from dsckpt.plan.consolidation import plan_consolidation

    plan = plan_consolidation(open_checkpoint(ROOT / "tests/fixtures/zero/z2-fp32-dp2/ckpt"))
    (embed,) = [t for t in plan.tensors if t.name == "embed.weight"]
    reads = [
        (r.source.path.name, r.source.offset, r.src_start, r.length, r.dst_start)
        for r in embed.reads
    ]
    assert reads == [
        ("zero_pp_rank_0_mp_rank_00_optim_states.pt", 4352, 0, 82, 0),
        ("zero_pp_rank_1_mp_rank_00_optim_states.pt", 4480, 0, 9, 82),
    ]
    doc = (ROOT / "docs" / "architecture.md").read_text()
    assert "| 1 | `zero_pp_rank_0_mp_rank_00_optim_states.pt` | 4352 | [0, 82) | [0, 82) |" in doc
    assert "| 2 | `zero_pp_rank_1_mp_rank_00_optim_states.pt` | 4480 | [0, 9) | [82, 91) |" in doc


# -- imports at the top of the module ----------------------------------------------------------

# Third-party modules imported inside functions on purpose, everywhere: heavy or optional ones
# whose import the commands that do not need them should not pay for (torch costs more than
# copying a small model; numpy and isal are optional; rich's measuring is only needed when a
# table is drawn). The standard library is not checked: a deferred `import time` hides no
# dependency between dsckpt's modules.
DEFERRED_THIRD_PARTY = {"torch", "numpy", "isal", "tomli", "rich"}


def _deferred_ok(name: str) -> bool:
    top = name.split(".")[0]
    return top in DEFERRED_THIRD_PARTY or top in sys.stdlib_module_names


# dsckpt modules that may import dsckpt modules inside functions, and why.
DEFERRED_BY_DESIGN = {
    # The public API resolves its names lazily: `import dsckpt` stays cheap.
    "dsckpt/__init__.py",
    # Typer apps import their work inside commands so `--help` and completion start fast
    # (STYLE.md rule 5): nothing under cli/ may pull torch in at import.
    *(str(p.relative_to(ROOT)) for p in (PACKAGE / "cli").glob("*.py")),
    # The torch .bin writer imports torch at the top; the safetensors path must not pay for it.
    "dsckpt/execute/formats/__init__.py",
    "dsckpt/execute/formats/optimizer_writer.py",
    # Two modules of one layer that need each other, the deferred side named here: the Hugging
    # Face front door builds on consolidation, which asks it about an HF folder output;
    # universal discovery builds on the layout Reader, which hands universal folders to it;
    # Trainer resolution and the nearby suggestion read files with the locating module's helpers
    # and are called from it.
    "dsckpt/api/consolidation.py",
    "dsckpt/discover/layout.py",
    "dsckpt/discover/files.py",
    "dsckpt/discover/trainer.py",
}

# Known, owned by the "plan" branch of issue 11 (the reshape writers move to execute/ and the
# executor's byte copy becomes public): remove each entry as its function-level imports go.
KNOWN = {
    "dsckpt/plan/pipeline_reshape.py",
    "dsckpt/execute/formats/crc.py",
    "dsckpt/execute/formats/torch_writer.py",
}


def _function_level_imports(path: Path, root: Path = ROOT) -> list[str]:
    """Imports inside a function or method (module level, class bodies, ``if TYPE_CHECKING:``
    and ``try: import x`` blocks are the top), naming dsckpt or a third-party module outside
    DEFERRED_THIRD_PARTY."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                visit(child, True)
                continue
            if in_function and isinstance(child, ast.Import | ast.ImportFrom):
                if isinstance(child, ast.ImportFrom):
                    names = [child.module or "."]
                else:
                    names = [a.name for a in child.names]
                for name in names:
                    if not _deferred_ok(name):
                        found.append(f"{path.relative_to(root)}:{child.lineno} imports {name}")
            visit(child, in_function)

    visit(ast.parse(path.read_text()), False)
    return found


def test_modules_import_at_the_top() -> None:
    exempt = DEFERRED_BY_DESIGN | KNOWN
    found = [
        hit
        for path in sorted(PACKAGE.rglob("*.py"))
        if str(path.relative_to(ROOT)) not in exempt
        for hit in _function_level_imports(path)
    ]
    assert found == [], "import at the top of the module, or document why not here"


def test_the_import_check_can_fail(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "import os\n\n\ndef f():\n    from dsckpt import errors\n"
        "    import torch\n    import json\n    import yaml\n"
    )
    hits = [h.split(" imports ")[1] for h in _function_level_imports(module, tmp_path)]
    assert hits == ["dsckpt", "yaml"]


def test_the_known_exceptions_are_still_needed() -> None:
    """An exemption nobody needs any more is removed, so the list only shrinks."""
    stale = [p for p in sorted(KNOWN) if not _function_level_imports(ROOT / p)]
    assert stale == [], "these modules import at the top now: drop them from KNOWN"
