"""What a run ran on: peak memory of this process, and the versions that shape a result."""

from __future__ import annotations

import platform
import resource
import sys

from safealign import __version__


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def versions() -> dict[str, str]:
    """Versions of Python and the libraries that shape a result."""
    import peft
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "safealign": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }
