"""Olive exports kept for reuse within one `phiedge build --all-targets` run (release.py)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from phiedge.build.plan import Plan


class Exports:
    """Olive outputs kept for reuse within one run: targets whose recipe, precision, int4 settings and
    provider agree (with today's targets: cpu, android and ios) share one export. Weight files are hard-linked
    (nothing writes them after the builder); the small files are copied, since phiedge edits them."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.done: dict[str, tuple[Path, list[str], str]] = {}

    @staticmethod
    def key(p: Plan, calibration: str | None) -> str:
        return json.dumps([p.recipe_name, p.precision, p.int4.model_dump(), p.target.execution_provider,
                           str(p.checkpoint.path), calibration, p.target.npu and p.target.npu.window], sort_keys=True)

    @staticmethod
    def copy(src: Path, dest: Path) -> list[str]:
        names = []
        for path in sorted(p for p in src.iterdir() if p.is_file()):
            if path.name.endswith(".onnx.data"):
                os.link(path, dest / path.name)
            else:
                shutil.copy2(path, dest / path.name)
            names.append(path.name)
        return names

    def get(self, key: str, dest: Path) -> tuple[list[str], list[str], str] | None:
        if key not in self.done:
            return None
        folder, passes, target = self.done[key]
        return self.copy(folder, dest), passes, target

    def put(self, key: str, src: Path, passes: list[str], target: str) -> None:
        folder = self.folder / str(len(self.done))
        folder.mkdir(parents=True)
        self.copy(src, folder)
        self.done[key] = (folder, passes, target)
