"""Write plans (dsckpt.plan.fileplan) and the one executor that runs them."""

from __future__ import annotations

import dataclasses
import functools
import gc
import weakref
import zipfile
import zlib
from pathlib import Path

import pytest
from conftest import ckpt

from dsckpt.api.consolidation import plan_for
from dsckpt.errors import IncompleteOutputError
from dsckpt.execute.executor import run
from dsckpt.execute.formats import SAFETENSORS, SHARDED, TORCH, output_plan
from dsckpt.plan.fileplan import (
    ByteRange,
    Copy,
    Crc32,
    DeferredFile,
    Duplicate,
    FilePlan,
    Literal,
    WritePlan,
)


def _plan(fmt: str, out: str, name: str = "z2-fp32-dp2", **kw) -> WritePlan:
    plan = plan_for(ckpt("zero", name), **kw)
    return output_plan(fmt, Path(out), plan, metadata={"format": "pt"}, max_shard_size="1KB")


@pytest.mark.parametrize(
    "fmt,out", [(SAFETENSORS, "m.safetensors"), (TORCH, "m.bin"), (SHARDED, "hf")]
)
def test_every_format_plans_every_byte_once(fmt: str, out: str) -> None:
    plan = _plan(fmt, out)
    assert plan.problems() == []
    consolidation = plan_for(ckpt("zero", "z2-fp32-dp2"))
    # What the progress bar counts is exactly the tensors' bytes: no header, no alias copy.
    assert plan.data_nbytes == consolidation.nbytes
    assert plan.directory == (fmt == SHARDED)
    if fmt == SHARDED:
        assert len(plan.files) > 2 and plan.files[-1].name == "model.safetensors.index.json"


def test_the_plan_is_the_file(tmp_path: Path) -> None:
    """The sizes the plan promises are the sizes written; the zip CRCs it derives are real."""
    plan = _plan(TORCH, "m.bin")
    out = tmp_path / "m.bin"
    run(plan, out)
    assert out.stat().st_size == plan.files[0].size == plan.size
    assert zipfile.ZipFile(out).testzip() is None  # every record's CRC checks
    crcs = [op for op in plan.files[0].derived if isinstance(op, Crc32)]
    assert crcs and all(len(op.at) == 2 for op in crcs)


def test_a_tied_alias_is_a_duplicate_in_safetensors() -> None:
    plan = _plan(SAFETENSORS, "m.safetensors", name="z3-bf16-dp2")
    consolidation = plan_for(ckpt("zero", "z3-bf16-dp2"))
    duplicates = [op for op in plan.files[0].derived if isinstance(op, Duplicate)]
    assert len(duplicates) == len(consolidation.aliases)


def test_describe_lists_files_sizes_and_ranges() -> None:
    plan = _plan(SHARDED, "hf")
    brief = plan.describe()
    assert [f["name"] for f in brief["files"]] == [f.name for f in plan.files]
    assert brief["size"] == sum(f["size"] for f in brief["files"])
    assert "ops" not in brief["files"][0]
    full = plan.describe(ranges=True)
    ops = full["files"][0]["ops"]
    assert ops[0] == {"op": "literal", "at": 0, "nbytes": ops[0]["nbytes"]}
    assert all(a["at"] + a["nbytes"] <= b["at"] for a, b in zip(ops, ops[1:], strict=False))
    copies = [op for op in ops if op["op"] == "copy"]
    assert copies and all(Path(op["source"]).is_file() for op in copies)


def test_problems_name_gaps_overlaps_and_out_of_bounds() -> None:
    src = ByteRange(Path("/nonexistent"), 0, 4)
    assert FilePlan("f", 8, (Literal(0, b"1234"), Copy(4, src))).problems() == []
    gap = FilePlan("f", 10, (Literal(0, b"1234"), Copy(6, src)))
    assert gap.problems() == ["f: bytes [4, 6) are never written"]
    twice = FilePlan("f", 6, (Literal(0, b"1234"), Copy(2, src)))
    assert "f: bytes [2, 4) are written twice" in twice.problems()
    outside = FilePlan("f", 6, (Literal(0, b"12"), Copy(2, src), Literal(6, b"x")))
    assert any("outside" in p for p in outside.problems())
    bad_crc = FilePlan("f", 4, (Literal(0, b"1234"),), (Crc32(0, 4, (2,)),))
    assert any("Crc32" in p for p in bad_crc.problems())
    plan = WritePlan((FilePlan("a", 0, ()), FilePlan("a", 0, ())), directory=True)
    assert "a: planned more than once" in plan.problems()


def test_an_unsound_plan_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    plan = WritePlan((FilePlan("m.safetensors", 10, (Literal(0, b"1234"),)),))
    with pytest.raises(IncompleteOutputError, match=r"bytes \[4, 10\) are never written"):
        run(plan, tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "kind,name,degrees",
    [
        ("zero", "z2-fp32-dp2", {"dp": 3}),
        ("zero", "z3-bf16-dp2", {"dp": 1}),
        ("pipe", "p2t2d1-z1-fp32", {"tp": 1, "pp": 1, "dp": 1}),
    ],
)
def test_a_dry_run_plans_exactly_the_bytes_a_reshape_writes(
    tmp_path: Path, kind: str, name: str, degrees: dict
) -> None:
    """The plan a dry run shows is the one the reshape runs: same files, same sizes, and every
    planned copy's source bytes are the output's bytes at its offset."""
    import dsckpt

    out = tmp_path / "out"
    dry = dsckpt.reshape(ckpt(kind, name), out, dry_run=True, **degrees)
    plan = dry.plan_files()
    assert not out.exists() and plan.problems() == []
    dsckpt.reshape(ckpt(kind, name), out, **degrees)
    written = {str(p.relative_to(out)): p for p in out.rglob("*") if p.is_file()}
    assert {f.name: f.size for f in plan.files} == {n: p.stat().st_size for n, p in written.items()}
    copies = 0
    for f in plan.files:
        data = bytearray(written[f.name].read_bytes())
        for crc in (op for op in f.derived if isinstance(op, Crc32)):
            want = zlib.crc32(data[crc.start : crc.start + crc.nbytes]).to_bytes(4, "little")
            for at in crc.at:
                assert data[at : at + 4] == want, f.name
                data[at : at + 4] = b"\0\0\0\0"  # as the literal holds it before the patch
        for op in f.ops:
            if isinstance(op, Copy):
                src = op.source
                with open(src.path, "rb") as fh:
                    fh.seek(src.offset)
                    assert data[op.at : op.at + op.nbytes] == fh.read(src.nbytes), f.name
                copies += 1
            elif isinstance(op, Literal):
                assert data[op.at : op.at + op.nbytes] == op.data, f.name
    assert copies > 0


def test_crcs_streamed_from_the_sources_equal_crcs_read_back(tmp_path: Path, monkeypatch) -> None:
    """Large copies get their CRC-32 from the source chunks while copying, small ones by reading
    the written bytes back: both give the same file, with zip CRCs that check."""
    import dsckpt
    from dsckpt.execute import executor
    from dsckpt.execute.formats.crc import CrcCopier

    streamed = []
    real_copy = CrcCopier.copy

    def spy(self, *args):
        streamed.append(args[-1])
        return real_copy(self, *args)

    monkeypatch.setattr(CrcCopier, "copy", spy)
    outputs = {}
    for minimum in (0, 1 << 60):  # always stream, never stream
        monkeypatch.setattr(executor, "STREAM_CRC_MIN", minimum)
        out = tmp_path / str(minimum)
        dsckpt.consolidate(ckpt("zero", "z2-fp32-dp2"), out / "m.bin")
        dsckpt.reshape(ckpt("zero", "z3-fp32-dp2"), out / "r", dp=3)
        assert bool(streamed) == (minimum == 0)
        streamed.clear()
        files = sorted(p for p in out.rglob("*") if p.is_file())
        for p in files:
            if p.suffix in (".bin", ".pt"):
                assert zipfile.ZipFile(p).testzip() is None, p
        outputs[minimum] = {str(p.relative_to(out)): p.read_bytes() for p in files}
    assert outputs[0] == outputs[1 << 60]


# -- deferred files: planned as they are written (ZeRO-3 model states, issue 16) -----------------


class _Builds:
    """Deferred copies of a plan's files; with ``one_at_a_time``, each build checks that the
    files built before it are gone (what the executor must do: hold one file plan at a time)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.alive: list[weakref.ref[FilePlan]] = []
        self.one_at_a_time = False

    def build(self, file: FilePlan) -> FilePlan:
        if self.one_at_a_time:
            gc.collect()
            assert [r() for r in self.alive if r() is not None] == [], "an earlier plan is held"
        copy = dataclasses.replace(file)
        self.alive.append(weakref.ref(copy))
        self.names.append(file.name)
        return copy

    def deferred(self, plan: WritePlan) -> WritePlan:
        """``plan`` with every file but the last deferred."""
        files = [DeferredFile(f.name, functools.partial(self.build, f)) for f in plan.files[:-1]]
        return dataclasses.replace(plan, files=(*files, plan.files[-1]))


def test_deferred_files_write_the_same_bytes_one_plan_at_a_time(tmp_path: Path) -> None:
    plan = _plan(SHARDED, "hf")
    builds = _Builds()
    deferred = builds.deferred(plan)
    assert deferred.deferred and deferred.data_nbytes < plan.data_nbytes
    assert deferred.resolved().describe(ranges=True) == plan.describe(ranges=True)
    run(plan, tmp_path / "whole")
    builds.names.clear()
    builds.one_at_a_time = True
    grown: list[int] = []
    run(deferred, tmp_path / "deferred", planned=grown.append)
    assert builds.names == [f.name for f in plan.files[:-1]]  # each planned once, in order
    assert deferred.data_nbytes + sum(grown) == plan.data_nbytes  # the bar's total, in the end
    for f in plan.files:
        assert (tmp_path / "whole" / f.name).read_bytes() == (
            tmp_path / "deferred" / f.name
        ).read_bytes()


def test_an_unsound_deferred_file_fails_the_run_and_nothing_is_committed(tmp_path: Path) -> None:
    good = FilePlan("a.bin", 4, (Literal(0, b"1234"),))
    bad = FilePlan("b.bin", 10, (Literal(0, b"1234"),))
    plan = WritePlan(
        (good, DeferredFile("b.bin", lambda: bad), FilePlan("index", 1, (Literal(0, b"x"),))),
        directory=True,
    )
    assert plan.problems() == []  # what can be checked before the file is planned
    with pytest.raises(IncompleteOutputError, match=r"b.bin: bytes \[4, 10\) are never written"):
        run(plan, tmp_path / "out")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    renamed = WritePlan((DeferredFile("c.bin", lambda: good),), directory=True)
    with pytest.raises(ValueError, match="c.bin was planned as a.bin"):
        run(renamed, tmp_path / "out2")


def test_a_zero3_reshape_defers_only_its_model_states_files(tmp_path: Path) -> None:
    from dsckpt.execute.formats.deepspeed_files import ZeroRankFiles
    from dsckpt.plan.zero_source import plan_reshape

    for name, deferred in (("z3-fp32-dp2", 3), ("z2-fp32-dp2", 0)):
        source, plan = plan_reshape(ckpt("zero", name), 3)
        lazy = ZeroRankFiles(source, plan).write_plan(defer=True)
        whole = ZeroRankFiles(source, plan).write_plan()
        later = [f.name for f in lazy.files if isinstance(f, DeferredFile)]
        assert len(later) == deferred
        assert all(n.endswith("_model_states.pt") for n in later)
        assert lazy.resolved().describe(ranges=True) == whole.describe(ranges=True)
