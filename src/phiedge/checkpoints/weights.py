"""A checkpoint's safetensors tensors by name, read a slice of rows at a time."""

from __future__ import annotations

from pathlib import Path


class Rows:
    """One tensor of a safetensors file, read a slice of rows at a time.

    The file is opened (memory-mapped) for each read and closed after it, so the pages read do not stay
    mapped: resident memory holds the rows being quantized, not the checkpoint.
    """

    def __init__(self, path: Path, name: str, shape: list[int]):
        self.path, self.name, self.shape = path, name, tuple(shape)

    def __getitem__(self, rows: slice):
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:
            return f.get_slice(self.name)[rows].clone()

    def read(self):
        return self[0: self.shape[0]] if self.shape else self[...]


class Weights:
    """Where each tensor of a checkpoint's safetensors files is, by name."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.tensors: dict[str, Rows] = {}
        for path in sorted(Path(folder).glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    self.tensors[name] = Rows(path, name, f.get_slice(name).get_shape())

    def names(self) -> list[str]:
        return list(self.tensors)

    def rows(self, name: str) -> Rows:
        return self.tensors[name]

    def tensor(self, name: str):
        return self.tensors[name].read()
