"""Helpers for the compare tests."""

from __future__ import annotations

from safealign.compare import run as compare_run


def stop_at_evaluator(monkeypatch) -> dict:
    """Make ``compare`` stop with ``KeyboardInterrupt`` where it builds its evaluator, before
    anything is scored, its checkpoints unchecked; returns the evaluator's keyword arguments
    (filled when it is reached)."""
    seen: dict = {}

    def evaluator(*sets, **kwargs):
        seen.update(kwargs)
        raise KeyboardInterrupt  # stop here: nothing is scored

    monkeypatch.setattr(compare_run, "Evaluator", evaluator)
    monkeypatch.setattr(compare_run, "check_checkpoints", lambda inputs: None)
    return seen
