"""Training prompts: each sequence draws a prompt and the prompt it switches to, as a function of the seed."""

from __future__ import annotations

import json
from pathlib import Path

from ..noise import noise_seed
from ..schedule import check_prompt


class PromptPairs:
    """(prompt, next prompt) pairs. A `.jsonl` file of stories (`{"prompts": [p0, p1, ...]}`, as LongLive's
    interactive demos) gives each consecutive pair of a story; a `.txt` file (one prompt a line) pairs
    each prompt with the next line's."""

    def __init__(self, pairs: list[tuple[str, str]]):
        if not pairs:
            raise ValueError("prompts: no prompt pairs")
        self.pairs = [(check_prompt(a), check_prompt(b)) for a, b in pairs]

    @classmethod
    def from_file(cls, path: str | Path) -> PromptPairs:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"prompts: no such file {path}")
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if path.suffix == ".jsonl":
            pairs = []
            for number, line in enumerate(lines, 1):
                story = json.loads(line).get("prompts")
                if not isinstance(story, list) or not story:
                    raise ValueError(f"prompts: line {number} of {path} has no 'prompts' list")
                pairs += list(zip(story, story[1:], strict=False)) or [(story[0], story[0])]
            return cls(pairs)
        return cls([(line, lines[(i + 1) % len(lines)]) for i, line in enumerate(lines)])

    def pick(self, seed: int, sequence: int, index: int) -> tuple[str, str]:
        """The pair of sequence `sequence`, row `index` (batch row x worker): the same on every run."""
        return self.pairs[noise_seed(seed, sequence, index) % len(self.pairs)]
