"""Until MoE is supported, every real MoE checkpoint is refused by every command that writes.

A MoE checkpoint read as a dense one loses its experts (their weights live in files of their
own) or misplaces their optimizer state: it must never be half-converted. inspect and show-map
still show what they can and exit 1 with the same one line.
"""

from __future__ import annotations

from pathlib import Path

import pytest

FIXTURES = Path(__file__).parents[1] / "fixtures" / "moe"
MOE = sorted(p.parent.name for p in FIXTURES.glob("*/facts.json"))


def test_the_moe_fixtures_are_there() -> None:
    assert len(MOE) >= 10


@pytest.mark.parametrize("name", MOE)
@pytest.mark.parametrize(
    "command",
    [
        ("to-fp32", "{out}/model.safetensors"),
        ("to-fp32", "{out}/hf"),
        ("reshape", "{out}/r", "--dp", "1"),
        ("inspect",),
        ("show-map",),
    ],
    ids=["safetensors", "shards", "reshape", "inspect", "show-map"],
)
def test_moe_checkpoint_is_refused(
    cli, tmp_path: Path, name: str, command: tuple[str, ...]
) -> None:
    out = tmp_path / "out"
    ckpt = FIXTURES / name / "ckpt"
    args = [command[0], str(ckpt), *(a.format(out=out) for a in command[1:])]
    result = cli(*args)
    assert result.exit_code == 1, result.output
    error = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1, result.stderr
    assert "mixture-of-experts" in error[0] and "not" in error[0], error[0]
    assert "Traceback" not in result.output
    assert not out.exists()
