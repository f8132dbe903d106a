"""The layers import downwards only: `longlive_core` never imports the service (`deployments`) or the job
system (`jobs`), not even lazily inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "longlive_core"
ABOVE_THE_CORE = {"deployments", "jobs"}


def imported_packages(path: Path) -> set[str]:
    """Top-level package of every absolute import in the file, wherever in it the import stands."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_no_core_module_imports_the_service_or_the_jobs():
    files = sorted(CORE.rglob("*.py"))
    assert len(files) > 20  # the scan found the package
    offenders = {
        str(path.relative_to(CORE.parent)): sorted(imported_packages(path) & ABOVE_THE_CORE) for path in files
    }
    assert {path: found for path, found in offenders.items() if found} == {}


def test_the_scan_sees_lazy_imports(tmp_path):
    # Control: an import inside a function counts as much as one at the top.
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from deployments.local import serve_forever\n    import jobs.worker\n")
    assert imported_packages(module) == {"deployments", "jobs"}
