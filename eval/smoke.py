"""Paths of the bundled smoke sets (written for this project; see data/README.md).

They let ``safealign eval`` run out of the box, not measure a model for release: a command
that falls back on one says so (:func:`smoke_warning`), and a gate refuses them.
"""

from pathlib import Path

DATA = Path(__file__).parent / "data"
SMOKE_HARMFUL = DATA / "smoke_harmful.jsonl"
SMOKE_BENIGN = DATA / "smoke_benign.jsonl"
SMOKE_SIZES = {SMOKE_HARMFUL: 110, SMOKE_BENIGN: 60}


def is_smoke(path: str | Path | None) -> bool:
    """Whether ``path`` is one of the bundled smoke sets."""
    return path is not None and Path(path).resolve() in SMOKE_SIZES


def smoke_warning(flag: str, path: Path) -> str:
    """What a command prints when ``flag`` falls back on the smoke set ``path``."""
    return (
        f"{flag} not given: using the bundled smoke set {path.name} ({SMOKE_SIZES[path]} "
        f"prompts written for this project, not a benchmark); pass {flag} FILE to measure"
    )
