"""README's table of figures, rendered from bench/results so the two cannot drift.

`bench/figures.md` is the table with placeholders `{file|row|column}` or `{file|row|column|regex}`: the
cell of `bench/results/<file>` in the table row whose first cell is `row`, under the header `column`
(a header cell of that table), or the regex's first group inside that cell. `python bench/figures.py`
writes the rendered table into README.md between `<!-- figures -->` and `<!-- /figures -->`;
tests/test_figures.py fails when README differs from the rendering.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "bench" / "figures.md"
README = ROOT / "README.md"
BEGIN, END = "<!-- figures -->", "<!-- /figures -->"
PLACEHOLDER = re.compile(r"\{([^{}|]+\.md)\|([^{}|]+)\|([^{}|]+)(?:\|([^{}]+))?\}")


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def lookup(results: Path, file: str, row: str, column: str, pattern: str | None = None) -> str:
    """The cell (or the pattern's first group in it) of `file`'s table row `row` under `column`."""
    header: list[str] | None = None
    for line in (results / file).read_text(encoding="utf-8").splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = _cells(line)
        if header is None:
            header = cells
        elif cells[0] == row and column in header:
            cell = cells[header.index(column)]
            if pattern is None:
                return cell
            found = re.search(pattern, cell)
            if not found:
                raise ValueError(f"{file}: {pattern!r} not in {row!r} / {column!r}: {cell!r}")
            return found.group(1)
    raise ValueError(f"{file} has no table row {row!r} with a column {column!r}")


def render(template: Path = TEMPLATE, results: Path = ROOT / "bench" / "results") -> str:
    text = template.read_text(encoding="utf-8")
    return PLACEHOLDER.sub(lambda m: lookup(results, *m.groups()), text).rstrip("\n")


def readme_table(readme: str) -> str:
    start, end = readme.index(BEGIN) + len(BEGIN), readme.index(END)
    return readme[start:end].strip("\n")


def write(readme: Path = README) -> None:
    text = readme.read_text(encoding="utf-8")
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    readme.write_text(f"{text[:start]}\n{render()}\n{text[end:]}", encoding="utf-8")


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    write()
