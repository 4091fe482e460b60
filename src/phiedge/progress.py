"""Progress on stderr (stdout carries results only)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from typing import TypeVar

T = TypeVar("T")


class Progress:
    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.start = time.perf_counter()

    def step(self, message: str) -> None:
        if not self.quiet:
            print(f"[phiedge {time.perf_counter() - self.start:6.1f}s] {message}", file=sys.stderr, flush=True)

    def warn(self, message: str) -> None:
        """Shown even with --quiet: the user must see it."""
        print(f"[phiedge] warning: {message}", file=sys.stderr, flush=True)

    def bar(self, total: int, desc: str):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, file=sys.stderr, disable=self.quiet, leave=False, dynamic_ncols=True)

    def iterate(self, items: list[T], desc: str) -> Iterator[T]:
        with self.bar(len(items), desc) as bar:
            for item in items:
                yield item
                bar.update(1)
