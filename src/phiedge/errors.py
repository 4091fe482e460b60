"""phiedge's own exceptions. The CLI turns each into a one-line error and a non-zero exit."""

from __future__ import annotations


class PhiedgeError(Exception):
    """Base class: anything phiedge can explain to a user in one line."""


class ConfigError(PhiedgeError):
    """A data file (target, recipe, variant) or an option is wrong; every problem is listed at once."""

    def __init__(self, where: str, problems: list[str]):
        self.where = where
        self.problems = problems
        super().__init__(f"{where}: " + "; ".join(problems))


class NotFoundError(PhiedgeError):
    """An unknown target, recipe or variant name; says which names exist."""


class ModelError(PhiedgeError):
    """The input checkpoint folder cannot be built (missing, not a Phi model, inconsistent)."""


class BuildError(PhiedgeError):
    """Olive or the model builder did not produce a usable model."""
