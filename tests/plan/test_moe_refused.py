"""MoE checkpoints dsckpt cannot convert are refused by every command that writes, never half
converted: AutoEP ZeRO-3 (experts partitioned by ``ds_zero_partition_groups``) everywhere.
inspect and show-map still show what they can and exit 1 with one line. (``reshape``'s own MoE
refusals are in tests/api/test_moe_reshape_dp.py.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

FIXTURES = Path(__file__).parents[1] / "fixtures" / "moe"
MOE = sorted(p.parent.name for p in FIXTURES.glob("*/facts.json"))
ZERO3 = [n for n in MOE if n.startswith("autoep-z3")]


def test_the_moe_fixtures_are_there() -> None:
    assert len(MOE) >= 10 and ZERO3


@pytest.mark.parametrize("name", ZERO3)
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
def test_autoep_zero3_is_refused(cli, tmp_path: Path, name: str, command: tuple[str, ...]) -> None:
    out = tmp_path / "out"
    ckpt = FIXTURES / name / "ckpt"
    args = [command[0], str(ckpt), *(a.format(out=out) for a in command[1:])]
    result = cli(*args)
    assert result.exit_code == 1, result.output
    error = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1, result.stderr
    assert "mixture-of-experts" in error[0] and "ds_zero_partition_groups" in error[0], error[0]
    assert "Traceback" not in result.output
    assert not out.exists()
