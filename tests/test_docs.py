"""Docs that run: every Python and shell snippet in README.md and docs/ runs here as written (on the
tiny model, in a scratch directory, time-bounded), or carries a mark saying what it needs, and the mark is
checked. Marks are an HTML comment on the line before the fence:

- `<!-- needs: weights -->`: the snippet loads a model whose weights CI does not have (checked: it names
  one, and that model is missing here); a Python one still runs here with the model swapped for tiny-random.
- `<!-- needs: gpu -->`: every command asks for a GPU (`--gpu`, `cuda`).
- `<!-- needs: service -->`: every command starts or talks to a running service (tested in test_serve*).
- `<!-- test-command -->`: the test command itself, which `.ci/run` runs.

Also: docs and comments point at files in the repo (docs/DESIGN.md, not a copy beside the repo).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LANGUAGES = {"python": "python", "bash": "bash", "sh": "bash", "shell": "bash"}
MARK = re.compile(r"<!-- (?:needs: (weights|gpu|service)\b.*|(test-command)) -->")
WEIGHTS_MODELS = ("longlive-1.3b", "wan2.1-t2v-1.3b")
SERVICE = (":8000", "$STREAM_URL", "longlive serve")
TIMEOUT_S = 180


@dataclass(frozen=True)
class Snippet:
    where: str  # file:line of the fence
    language: str  # python | bash
    code: str
    mark: str | None  # weights | gpu | service | test-command | None: runs here

    def commands(self) -> list[str]:
        """Shell commands: continuation lines joined, comments and blank lines dropped."""
        joined = self.code.replace("\\\n", " ")
        return [line for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def snippets() -> list[Snippet]:
    found = []
    for doc in DOCS:
        lines = doc.read_text(encoding="utf-8").splitlines()
        i = 0
        while i < len(lines):
            fence = re.fullmatch(r"```(\w+)\s*", lines[i])
            if not fence:
                i += 1
                continue
            end = lines.index("```", i + 1)
            language = LANGUAGES.get(fence.group(1))
            if language:
                before = next((line for line in reversed(lines[:i]) if line.strip()), "")
                mark = MARK.fullmatch(before.strip())
                if before.lstrip().startswith("<!--") and not mark:
                    raise ValueError(f"{doc.name}:{i + 1}: unknown snippet mark {before.strip()!r}")
                found.append(
                    Snippet(
                        f"{doc.relative_to(ROOT)}:{i + 1}",
                        language,
                        "\n".join(lines[i + 1 : end]) + "\n",
                        mark and (mark.group(1) or mark.group(2)),
                    )
                )
            i = end + 1
    return found


SNIPPETS = snippets()


def _run(snippet: Snippet, code: str, cwd: Path) -> None:
    for name in ("examples", "jobs"):  # what the snippets read by relative path
        (cwd / name).symlink_to(ROOT / name)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env["PYTHONPATH"] = str(ROOT)
    command = [sys.executable, "-c", code] if snippet.language == "python" else ["bash", "-euo", "pipefail"]
    result = subprocess.run(
        command,
        input=None if snippet.language == "python" else code,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert result.returncode == 0, f"{snippet.where} failed:\n{result.stdout[-2000:]}{result.stderr[-4000:]}"


def test_the_docs_have_snippets_of_every_kind():
    """The extraction finds what is there (a parser that finds nothing would pass everything)."""
    assert {s.mark for s in SNIPPETS} == {None, "weights", "gpu", "service", "test-command"}
    assert {s.language for s in SNIPPETS if s.mark is None} == {"python", "bash"}


@pytest.mark.parametrize("snippet", [s for s in SNIPPETS if s.mark is None], ids=lambda s: s.where)
def test_unmarked_snippets_run_as_written(snippet, tmp_path):
    _run(snippet, snippet.code, tmp_path)
    for output in re.findall(r"-o (\S+)", snippet.code):  # what a command says it writes, it wrote
        assert (tmp_path / output).is_file(), f"{snippet.where}: no {output}"


@pytest.mark.parametrize("snippet", [s for s in SNIPPETS if s.mark == "weights"], ids=lambda s: s.where)
def test_weights_snippets_name_a_model_missing_here_and_run_on_the_tiny_one(snippet, tmp_path):
    commands = snippet.commands() if snippet.language == "bash" else [snippet.code]
    for command in commands:
        assert any(m in command for m in WEIGHTS_MODELS), f"{snippet.where}: needs no weights: {command}"
    # The mark is true here: with an empty Hugging Face cache the model is missing (and never downloaded).
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    probe = "from longlive_core import resolve_model_files; resolve_model_files('longlive-1.3b')"
    missing = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert missing.returncode != 0 and "MissingWeightsError" in missing.stderr, missing.stderr[-2000:]
    if snippet.language == "python":
        tiny = snippet.code
        for model in WEIGHTS_MODELS:
            tiny = tiny.replace(f'"{model}"', '"tiny-random"')
        assert tiny != snippet.code
        (tmp_path / "run").mkdir()
        _run(snippet, tiny, tmp_path / "run")


@pytest.mark.parametrize("snippet", [s for s in SNIPPETS if s.mark == "gpu"], ids=lambda s: s.where)
def test_gpu_snippets_ask_for_a_gpu(snippet):
    for command in snippet.commands():
        assert "--gpu" in command or "cuda" in command, f"{snippet.where}: runs without a GPU: {command}"


@pytest.mark.parametrize("snippet", [s for s in SNIPPETS if s.mark == "service"], ids=lambda s: s.where)
def test_service_snippets_talk_to_a_running_service(snippet):
    for command in snippet.commands():
        assert any(s in command for s in SERVICE), f"{snippet.where}: needs no service: {command}"


def test_the_test_command_snippet_is_the_one_ci_runs():
    (snippet,) = [s for s in SNIPPETS if s.mark == "test-command"]
    assert snippet.where.startswith("README.md") and "pytest" in snippet.code
    assert "<!-- test-command -->" in (ROOT / ".ci" / "run").read_text()


def test_docs_and_comments_point_into_the_repo():
    """The design is cited as docs/DESIGN.md (not the copy beside the repo); Markdown links resolve."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    stale = []
    for name in tracked.stdout.splitlines():
        path = ROOT / name
        if path.suffix not in {".py", ".md", ".yaml", ".toml"} or name == "tests/test_docs.py":
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if re.search(r"(?<!docs/)\bDESIGN\.md", line):
                stale.append(f"{name}:{number}")
    assert not stale, f"design references outside docs/DESIGN.md: {stale}"
    for doc in [*DOCS, *ROOT.glob("*/README.md")]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", doc.read_text(encoding="utf-8")):
            assert (doc.parent / target).exists(), f"{doc.relative_to(ROOT)} links to missing {target}"
