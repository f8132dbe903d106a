"""README's table of figures is the rendering of bench/figures.md from bench/results (bench/figures.py)."""

from __future__ import annotations

import shutil

import pytest

from bench.figures import README, TEMPLATE, readme_table, render


def test_readme_table_is_rendered_from_the_results():
    assert readme_table(README.read_text(encoding="utf-8")) == render()


def test_a_changed_result_changes_the_rendering(tmp_path):
    # Control: the rendering reads the results (a new figure there shows up, a missing row fails).
    results = tmp_path / "results"
    shutil.copytree(TEMPLATE.parent / "results", results)
    engine = results / "engine_compiled_h100.md"
    engine.write_text(engine.read_text().replace("| 1 | 333.3 | 36.0 |", "| 1 | 333.3 | 99.9 |"))
    assert "99.9 FPS (333 ms / 12-frame block)" in render(results=results)
    engine.write_text("# empty\n")
    with pytest.raises(ValueError, match="no table row"):
        render(results=results)
