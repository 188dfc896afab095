"""MoE checkpoints dsckpt cannot convert are refused by every command that writes, never half
converted. `reshape` of MoE checkpoints waits for the reshape of expert groups (issue 13, the
moe-reshape branch); pipeline + MoE, MoE with TP and native MoE with ZeRO-3 are refused by
discovery (tests/discover/test_moe_layout.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

FIXTURES = Path(__file__).parents[1] / "fixtures" / "moe"
MOE = sorted(p.parent.name for p in FIXTURES.glob("*/facts.json"))


def test_the_moe_fixtures_are_there() -> None:
    assert len(MOE) >= 10


@pytest.mark.parametrize(
    "name",
    ["z1-fp32-ep2-dp4", "z2-fp32-ep2-dp2", "autoep-z2-fp32-ep2-dp2", "autoep-z3-fp32-ep2-dp2"],
)
def test_moe_reshape_is_refused(cli, tmp_path: Path, name: str) -> None:
    out = tmp_path / "out"
    result = cli("reshape", str(FIXTURES / name / "ckpt"), str(out), "--dp", "1")
    assert result.exit_code == 1, result.output
    error = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "mixture-of-experts" in error[0], result.stderr
    assert "Traceback" not in result.output
    assert not out.exists()
