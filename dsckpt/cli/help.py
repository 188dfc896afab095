"""How `--help` reads: arguments named as in the docs (CKPT OUT), examples kept line by line.

Typer writes a required argument as ``{ckpt}`` in the usage line and Click re-flows an epilog
into one paragraph, which would glue the example command lines together. :class:`Command`
changes only those two things; everything else is Typer's own help.
"""

from __future__ import annotations

from typing import Any

from typer.core import TyperCommand


class Command(TyperCommand):
    """A Typer command whose usage line names arguments by their metavar and whose epilog (the
    Examples section) is written as it is, one line per example."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name != "argument":
                pieces.extend(param.get_usage_pieces(ctx))
                continue
            name = param.metavar or (param.name or "").upper()
            pieces.append(name if param.required else f"[{name}]")
        return pieces

    def format_epilog(self, ctx: Any, formatter: Any) -> None:
        write_epilog(self.epilog, formatter)


def write_epilog(epilog: str | None, formatter: Any) -> None:
    """An epilog as written, line by line (Click would re-flow it into one paragraph)."""
    if not epilog:
        return
    formatter.write_paragraph()
    with formatter.indentation():
        for line in epilog.strip("\n").splitlines():
            formatter.write(f"{'':>{formatter.current_indent}}{line}\n" if line else "\n")


def examples(*lines: str) -> str:
    """An Examples section: shown by ``--help`` and, indented, as a code block in docs/cli.md."""
    return "Examples:\n\n" + "\n".join(f"    {line}" for line in lines)
