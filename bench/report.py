"""The markdown report every bench script prints and writes to --out."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path


def command_line() -> str:
    """The command that ran this bench, for the report."""
    return f"python {' '.join(shlex.quote(a) for a in sys.argv)}"


def emit(title: str, meta: list[str], body: list[str], out: Path | None) -> str:
    """Print `# title`, the meta bullet lines and the tables; write the same text to `out` if given."""
    report = "\n".join([f"# {title}", "", *meta, "", *body, ""])
    print(report)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report)
    return report
