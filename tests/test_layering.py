"""The layers import downwards only: `longlive_core` never imports the service (`deployments`) or the job
system (`jobs`), not even lazily inside a function; the client (`longlive_client`) imports none of them
but the core's torch-free schedule rules, and neither torch nor the server's libraries."""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "longlive_core"
CLIENT = CORE.parent / "longlive_client"
ABOVE_THE_CORE = {"deployments", "jobs", "longlive_client"}
NOT_FOR_THE_CLIENT = {"deployments", "jobs", "torch", "ray", "fastapi", "redis", "boto3", "starlette"}


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


def test_the_client_imports_no_server_package_and_of_the_core_only_its_schedule():
    files = sorted(CLIENT.rglob("*.py"))
    assert len(files) > 5
    offenders = {
        str(path.relative_to(CLIENT.parent)): sorted(imported_packages(path) & NOT_FOR_THE_CLIENT)
        for path in files
    }
    assert {path: found for path, found in offenders.items() if found} == {}
    core = {
        node.module
        for path in files
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("longlive_core")
    }
    assert core == {"longlive_core.schedule"}  # torch-free (tests/test_torch_free_ingress.py)


def test_the_scan_sees_lazy_imports(tmp_path):
    # Control: an import inside a function counts as much as one at the top.
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from deployments.local import serve_forever\n    import jobs.worker\n")
    assert imported_packages(module) == {"deployments", "jobs"}
