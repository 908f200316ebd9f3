"""Shared fixtures. ``lab``: the test-size lab, built once and cached on disk across sessions
(under ``$SAFEALIGN_CACHE`` or ``~/.cache/safealign``).

Tests never reach the network: the hub is offline for the whole session (set before
``huggingface_hub`` reads it at import), so a reference shaped like a hub id that is not a local
folder fails at once from the (empty) cache instead of trying the hub.
"""

from __future__ import annotations

import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def lab():
    from safealign.lab import build

    return build(size="test")
