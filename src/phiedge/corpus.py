"""Text every machine with Python has: the standard library's own sources.

In the spirit of Phi-1's code-textbook data, and the only corpus a machine without a hub can count on.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path


def stdlib_files(limit_bytes: int | None = None) -> list[Path]:
    """Top-level stdlib modules in name order (deterministic for a given Python version)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for path in sorted(root.glob("*.py")):
        size = path.stat().st_size
        if limit_bytes is not None and total + size > limit_bytes:
            break
        files.append(path)
        total += size
    return files


def stdlib_text(limit_bytes: int | None = None) -> str:
    return "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files(limit_bytes))
