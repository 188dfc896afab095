"""The public API: ``dsckpt.consolidate(...)`` and friends, lazily imported, stay callables."""

from __future__ import annotations

import importlib
import subprocess
import sys

import dsckpt


def test_api_names_stay_functions_after_their_modules_are_imported() -> None:
    # A submodule named like an API function would replace it on the package once imported.
    for module in (
        "api.consolidation",
        "api.reshaping",
        "plan.zero_reshape",
        "plan.pipeline_reshape",
        "discover.layout",
    ):
        importlib.import_module(f"dsckpt.{module}")
    for name in ("consolidate", "state_dict", "load_into", "reshape", "open_checkpoint"):
        assert callable(getattr(dsckpt, name)) and not isinstance(getattr(dsckpt, name), type(sys))


def test_importing_the_package_does_not_import_torch() -> None:
    code = "import sys, dsckpt; dsckpt.__all__; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
