"""Output hygiene: no terminal escape from a file reaches the terminal, `--json` is strict JSON,
show-map tells the findings, every OS failure is one line, and Ctrl-C tells the truth."""

from __future__ import annotations

import errno
import json
import math
import re
import shutil
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import PIPE, ZERO, ckpt

from dsckpt.printable import printable
from dsckpt.render import to_json

OSC_TITLE = "\x1b]0;pwned\x07"
CLEAR = "\x1b[2J"
# Any C0 control but the newline that ends lines, DEL, any C1 (\x9b is the 8-bit CSI).
RAW_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")


def _clean(*texts: str) -> None:
    for t in texts:
        found = RAW_CONTROL.search(t)
        assert found is None, f"raw control {found.group()!r} reached the terminal: {t!r}"


def _one_error_line(result) -> str:  # type: ignore[no-untyped-def]
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


# --- printable ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("embed.weight", "embed.weight"),
        ("Gewichte.Größe.重み", "Gewichte.Größe.重み"),  # letters of any script stay
        ("a b", "a b"),
        (OSC_TITLE, "\\x1b]0;pwned\\x07"),
        (CLEAR, "\\x1b[2J"),
        ("a\rb\nc\td", "a\\rb\\nc\\td"),
        ("\x9b31m", "\\x9b31m"),  # the 8-bit CSI
        ("\x7f\x00", "\\x7f\\x00"),
        ("x\u202etxt.exe", "x\\u202etxt.exe"),  # a bidi override reorders what is shown
        ("a\u2028b", "a\\u2028b"),  # a Unicode line separator
        ("name\udc9b", "name\\udc9b"),  # an undecodable file-name byte (surrogateescape)
    ],
)
def test_printable_escapes_controls_only(raw: str, shown: str) -> None:
    assert printable(raw) == shown
    assert printable(raw).isprintable()


# --- a checkpoint whose names carry terminal escapes -------------------------------------------

MARKUP_NAME = "[bold]head_bias[/]"


def _rename(obj: Any, names: dict[str, str]) -> Any:
    """``obj`` with every string equal to a key of ``names`` (dict keys and values) renamed."""
    if isinstance(obj, str):
        return names.get(obj, obj)
    if isinstance(obj, OrderedDict):
        return OrderedDict((_rename(k, names), _rename(v, names)) for k, v in obj.items())
    if type(obj) is dict:
        return {_rename(k, names): _rename(v, names) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(_rename(v, names) for v in obj)
    return obj


def _hostile(root: Path, name: str = "z2-fp32-dp2", tag: str | None = None) -> Path:
    """A copy of fixture ``name`` at ``root`` whose key names, DeepSpeed version and an unrelated
    file name hold terminal escapes, one key Rich markup; the tag is renamed to ``tag``."""
    shutil.copytree(ckpt("zero", name), root)
    old_tag = (root / "latest").read_text().strip()
    tag_dir = root / old_tag
    model = torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=False)
    names = {k: k.replace(".", CLEAR + ".", 1) + OSC_TITLE for k in model["module"]}
    names["head_bias"] = MARKUP_NAME
    for shapes in model["param_shapes"]:
        names.update({k: k + CLEAR for k in shapes if k not in names})
    for path in tag_dir.glob("*.pt"):
        sd = _rename(torch.load(path, weights_only=False), names)
        if "ds_version" in sd:
            sd["ds_version"] = "0.19.8" + CLEAR
        torch.save(sd, path)
    (tag_dir / f"notes{OSC_TITLE}{CLEAR}\x9b.txt").write_text("not a checkpoint file")
    if tag is not None:
        tag_dir.rename(root / tag)
        (root / "latest").write_text(tag)
    return root


@pytest.fixture
def hostile(tmp_path: Path) -> Path:
    return _hostile(tmp_path / f"ck{CLEAR}pt")


def test_inspect_escapes_names_and_values(cli, hostile: Path) -> None:
    result = cli("inspect", hostile, "--params")
    _clean(result.stdout, result.stderr)
    assert result.exit_code == 0, result.output
    # Names are folded at the table's width: look for the escapes, each whole.
    assert "\\x1b]0;pwned\\x07" in result.stdout and "embed\\x1b[2J.weight" in result.stdout
    assert "0.19.8\\x1b[2J" in result.stdout
    assert MARKUP_NAME in result.stdout  # Rich markup in a name is shown, not applied


def test_inspect_json_keeps_names_exact(cli, hostile: Path) -> None:
    result = cli("inspect", hostile, "--params", "--json")
    assert result.exit_code == 0, result.output
    _clean(result.stdout)  # json.dumps writes \u001b
    data = json.loads(result.stdout)
    assert {p["name"] for p in data["params"]} >= {"embed" + CLEAR + ".weight" + OSC_TITLE}
    assert data["ds_version"] == "0.19.8" + CLEAR


@pytest.mark.parametrize(
    "args",
    [
        ("show-map",),
        ("show-map", "--dp", "3"),
        ("show-map", "--json"),
        ("reshape", "{out}", "--dp", "3", "--dry-run"),
        ("reshape", "{out}", "--dp", "3"),
        ("to-fp32", "{out}.safetensors"),
        ("to-fp32", "{out}.bin"),
        ("to-fp32", "{out}"),
    ],
)
def test_every_command_escapes(cli, hostile: Path, tmp_path: Path, args: tuple[str, ...]) -> None:
    out = str(tmp_path / f"out{OSC_TITLE}")
    result = cli(args[0], hostile, *(a.format(out=out) for a in args[1:]))
    _clean(result.stdout, result.stderr)
    assert result.exit_code == 0, result.output
    if args[0] in ("to-fp32", "reshape") and "--dry-run" not in args:
        assert "out\\x1b]0;pwned\\x07" in result.stdout  # the result line names OUT, escaped


@pytest.mark.parametrize("command", ["inspect", "show-map", "to-fp32", "reshape"])
def test_a_tag_with_escapes_never_reaches_the_terminal(cli, tmp_path: Path, command: str) -> None:
    root = _hostile(tmp_path / "ckpt", tag=f"global_step3{OSC_TITLE}{CLEAR}\x9b")
    extra = {"to-fp32": [tmp_path / "o.safetensors"], "reshape": [tmp_path / "o", "--dp", "3"]}
    result = cli(command, root, *extra.get(command, []))
    _clean(result.stdout, result.stderr)
    assert result.exit_code in (0, 1)  # a tag with controls may be refused, never printed raw
    if result.exit_code:
        _one_error_line(result)


def test_the_error_line_escapes_what_it_quotes(cli, tmp_path: Path) -> None:
    line = _one_error_line(cli("inspect", tmp_path / f"gone{OSC_TITLE}\n{CLEAR}"))
    _clean(line)
    assert "gone\\x1b]0;pwned\\x07\\n\\x1b[2J" in line


def test_a_subprocess_writes_no_escape_byte(tmp_path: Path, hostile: Path) -> None:
    """The bytes on the real stdout/stderr, not only what CliRunner decodes."""
    repo = Path(__file__).parents[2]
    out = subprocess.run(
        [sys.executable, "-m", "dsckpt", "inspect", str(hostile), "--params"],
        capture_output=True,
        env={"PATH": "/usr/bin:/bin", "DSCKPT_WIDTH": "100", "PYTHONPATH": str(repo)},
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    for stream in (out.stdout, out.stderr):
        assert b"\x1b" not in stream and b"\x07" not in stream and b"\xc2\x9b" not in stream


# --- strict JSON --------------------------------------------------------------------------------


def _strict(text: str) -> Any:
    def refuse(token: str) -> Any:
        raise AssertionError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def test_to_json_makes_every_value_plain() -> None:
    import enum
    from dataclasses import dataclass

    class Level(enum.Enum):
        ERROR = "error"

    @dataclass
    class Point:
        x: float
        where: Path

    data = {
        "nan": math.nan,
        "inf": math.inf,
        "ninf": -math.inf,
        "set": {3, 1, 2},
        "tuple": (1, (2, 3)),
        "path": Path("/a/b"),
        "enum": Level.ERROR,
        "point": Point(math.nan, Path("x")),
        1: "int key",
        "object": object.__new__(type("Odd", (), {"__str__": lambda self: "odd"})),
        "tensor": torch.tensor(1.5),
        "big": 10**40,
    }
    got = _strict(to_json(data))
    assert got == {
        "nan": "NaN",
        "inf": "Infinity",
        "ninf": "-Infinity",
        "set": [1, 2, 3],
        "tuple": [1, [2, 3]],
        "path": "/a/b",
        "enum": "error",
        "point": {"x": "NaN", "where": "x"},
        "1": "int key",
        "object": "odd",
        "tensor": 1.5,
        "big": 10**40,
    }
    looped: list[Any] = []
    looped.append(looped)
    assert _strict(to_json(looped)) == ["<circular>"]


def test_a_nan_from_the_layout_is_a_string(copy_fixture) -> None:
    import dataclasses

    from dsckpt.discover.layout import open_checkpoint
    from dsckpt.render import layout_json

    layout = dataclasses.replace(open_checkpoint(ckpt("zero", "z2-fp32-dp2")), iteration=math.nan)
    assert _strict(to_json(layout_json(layout)))["iteration"] == "NaN"


@pytest.mark.parametrize(
    ("kind", "name"), [("zero", n) for n in ZERO] + [("pipe", n) for n in PIPE]
)
def test_json_of_every_fixture_is_strict(cli, kind: str, name: str) -> None:
    for args in (("inspect", "--params", "--json"), ("show-map", "--json")):
        result = cli(args[0], ckpt(kind, name), *args[1:])
        assert result.exit_code == 0, result.output
        data = _strict(result.stdout)
        assert data["findings"] == [] or all(f["level"] != "error" for f in data["findings"])


# --- show-map tells what inspect tells ----------------------------------------------------------


def _tag(root: Path) -> Path:
    return root / (root / "latest").read_text().strip()


def _break_missing_rank(root: Path) -> None:
    (_tag(root) / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()


def _break_missing_layer(root: Path) -> None:
    (_tag(root) / "layer_03-model_01-model_states.pt").unlink()


def _break_mixed_runs(root: Path) -> None:
    tag = _tag(root)
    (tag / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(
        (tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt").read_bytes()
    )


def _break_stale_rank(root: Path) -> None:
    tag = _tag(root)
    (tag / "zero_pp_rank_2_mp_rank_00_optim_states.pt").write_bytes(
        (tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt").read_bytes()
    )


def _break_truncated(root: Path) -> None:
    victim = _tag(root) / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])


BROKEN = {
    "missing rank": ("zero", "z1-fp32-dp3", _break_missing_rank, ()),
    "missing layer file": ("pipe", "p2t2d1-z1-fp32", _break_missing_layer, ()),
    "missing layer file, target": ("pipe", "p2t2d1-z1-fp32", _break_missing_layer, ("--tp", "1")),
    "mixed runs": ("zero", "z2-fp32-dp2", _break_mixed_runs, ()),
    "stale rank": ("zero", "z2-fp32-dp2", _break_stale_rank, ("--dp", "3")),
    "truncated file": ("zero", "z2-fp32-dp2", _break_truncated, ()),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_show_map_reports_inspects_findings_and_exits_1(cli, copy_fixture, case: str) -> None:
    kind, name, damage, flags = BROKEN[case]
    root = copy_fixture(kind, name)
    damage(root)
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    inspected = cli("inspect", root)
    line = _one_error_line(inspected)
    shown = cli("show-map", root, *flags)
    assert _one_error_line(shown) == line  # the same first error, the same count
    as_json = cli("show-map", root, "--json", *flags)
    assert _one_error_line(as_json) == line
    if as_json.stdout:  # a file that cannot be read at all stops discovery: no map to print
        assert "Source:" in shown.stdout  # what can be mapped is shown
        assert "Findings" in shown.stdout
        errors = [f for f in _strict(as_json.stdout)["findings"] if f["level"] == "error"]
        inspected_json = _strict(cli("inspect", root, "--json").stdout)
        assert errors == [f for f in inspected_json["findings"] if f["level"] == "error"]
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before


# --- the last-resort net ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "advice"),
    [
        (errno.EACCES, "check the permissions"),
        (errno.EROFS, "read-only"),
        (errno.ENAMETOOLONG, "shorter path"),
        (errno.ENOTDIR, "not a directory"),
        (errno.ELOOP, "symbolic link loop"),
        (errno.EIO, "check the disk"),
        (errno.ENOSPC, "free some space"),
        (errno.EXFULL, "check the path and the file system"),  # no advice of its own
    ],
)
def test_an_os_error_is_one_line(cli, monkeypatch, tmp_path: Path, code: int, advice: str) -> None:
    import os

    import dsckpt.discover.layout

    victim = tmp_path / f"rank{CLEAR}.pt"

    def fail(*args: Any, **kwargs: Any) -> None:
        raise OSError(code, os.strerror(code), str(victim))

    monkeypatch.setattr(dsckpt.discover.layout, "open_checkpoint", fail)
    line = _one_error_line(cli("inspect", tmp_path))
    _clean(line)
    assert line.startswith(f"error: {tmp_path}/rank\\x1b[2J.pt: {os.strerror(code)}: ")
    assert advice in line


@pytest.mark.parametrize(
    ("exc", "words"),
    [(MemoryError(), "out of memory"), (RecursionError(), "nests its data too deeply")],
)
def test_memory_and_recursion_exhaustion_are_one_line(
    cli, monkeypatch, tmp_path: Path, exc: BaseException, words: str
) -> None:
    import dsckpt.discover.layout

    def fail(*args: Any, **kwargs: Any) -> None:
        raise exc

    monkeypatch.setattr(dsckpt.discover.layout, "open_checkpoint", fail)
    assert words in _one_error_line(cli("inspect", tmp_path))


def test_debug_shows_the_os_error(cli, monkeypatch, tmp_path: Path) -> None:
    import dsckpt.discover.layout

    def fail(*args: Any, **kwargs: Any) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path))

    monkeypatch.setattr(dsckpt.discover.layout, "open_checkpoint", fail)
    monkeypatch.setenv("DSCKPT_DEBUG", "1")
    assert isinstance(cli("inspect", tmp_path).exception, PermissionError)


def test_real_file_system_failures_are_one_line(cli, tmp_path: Path) -> None:
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for path in (loop, a_file / "ckpt", tmp_path / ("n" * 300), loop / "x"):
        for args in (("inspect", path), ("show-map", path), ("to-fp32", path, tmp_path / "o.bin")):
            _one_error_line(cli(*args))
    assert not (tmp_path / "o.bin").exists()
    src = ckpt("zero", "z2-fp32-dp2")
    line = _one_error_line(cli("to-fp32", src, a_file / "sub" / "o.safetensors"))
    assert "file" in line


def test_an_unknown_exception_keeps_its_traceback(cli, monkeypatch, tmp_path: Path) -> None:
    import dsckpt.discover.layout

    def fail(*args: Any, **kwargs: Any) -> None:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(dsckpt.discover.layout, "open_checkpoint", fail)
    assert isinstance(cli("inspect", tmp_path).exception, ZeroDivisionError)


# --- Ctrl-C -------------------------------------------------------------------------------------


def test_interrupt_before_anything_is_written(cli, monkeypatch, tmp_path: Path) -> None:
    import dsckpt.api.consolidation

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(dsckpt.api.consolidation, "consolidate", interrupted)
    out = tmp_path / "o.safetensors"
    result = cli("to-fp32", ckpt("zero", "z2-fp32-dp2"), out)
    assert result.exit_code == 130
    assert result.stderr.strip() == "interrupted: nothing was written"
    assert not out.exists()


def test_interrupt_after_out_was_committed_says_so(cli, monkeypatch, tmp_path: Path) -> None:
    import dsckpt.api.consolidation

    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text("{}")

    def commits_then_interrupted(ckpt: Any, dest: Path, **kwargs: Any) -> None:
        (Path(dest) / "model.safetensors").write_bytes(b"done")
        raise KeyboardInterrupt

    monkeypatch.setattr(dsckpt.api.consolidation, "consolidate", commits_then_interrupted)
    result = cli("to-fp32", ckpt("zero", "z2-fp32-dp2"), out, "--force")
    assert result.exit_code == 130
    assert "nothing was written" not in result.stderr
    assert "had already been (partly) written" in result.stderr


def test_interrupt_of_a_read_only_command(cli, monkeypatch, tmp_path: Path) -> None:
    import dsckpt.discover.layout

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(dsckpt.discover.layout, "open_checkpoint", interrupted)
    result = cli("show-map", tmp_path)
    assert result.exit_code == 130 and result.stderr.strip() == "interrupted: nothing was written"
