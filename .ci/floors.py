"""Print `name==floor` for every direct dependency of the project, and for the extras' packages named on
the command line, except torch (installed pinned, from local disk). The lowest-versions CI step installs
exactly these, so a floor in pyproject.toml is a version that was installed and tested."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

SPEC = re.compile(r"^([A-Za-z0-9_.\-]+(?:\[[^\]]*\])?)\s*(.*)$")


def floor(requirement: str) -> tuple[str, str]:
    """'numpy>=1.24' -> ('numpy', 'numpy==1.24'); 'ray[serve]>=2.60,<2.61' -> ('ray', 'ray[serve]==2.60')."""
    name, specs = SPEC.match(requirement.split(";")[0].strip()).groups()
    base = re.sub(r"\[.*\]", "", name).lower().replace("_", "-")
    for spec in (s.strip() for s in specs.split(",")):
        if spec.startswith(">=") or spec.startswith("=="):
            return base, f"{name}=={spec[2:]}"
    raise SystemExit(f"{requirement!r} has no floor (>= or ==): every direct dependency needs one")


def main(extra_packages: list[str]) -> None:
    project = tomllib.loads(Path(__file__).resolve().parents[1].joinpath("pyproject.toml").read_text())
    project = project["project"]
    floors = dict(floor(r) for r in project["dependencies"])
    wanted = {p.lower().replace("_", "-") for p in extra_packages}
    for requirements in project["optional-dependencies"].values():
        for base, pinned in map(floor, (r for r in requirements if not r.startswith(project["name"]))):
            if base in wanted:
                floors.setdefault(base, pinned)
    missing = wanted - floors.keys()
    if missing:
        raise SystemExit(f"not a dependency of any extra: {sorted(missing)}")
    floors.pop("torch")
    print("\n".join(floors.values()))


if __name__ == "__main__":
    main(sys.argv[1:])
