"""phiedge's own exceptions. The CLI turns each into a one-line error and a non-zero exit."""

from __future__ import annotations


class PhiedgeError(Exception):
    """Base class: anything phiedge can explain to a user in one line."""


class ConfigError(PhiedgeError):
    """A data file (target, recipe, variant) or an option is wrong; every problem is listed at once."""

    def __init__(self, where: str, problems: list[str]):
        self.problems = problems
        super().__init__(f"{where}: " + "; ".join(problems))


class NotFoundError(PhiedgeError):
    """An unknown target, recipe or variant name; says which names exist."""


class ModelError(PhiedgeError):
    """The input checkpoint folder cannot be built (missing, not a Phi model, inconsistent)."""


class BuildError(PhiedgeError):
    """Olive or the model builder did not produce a usable model."""


class ArtifactError(PhiedgeError):
    """A file phiedge wrote into a model folder (build record, validation report) is not what it writes:
    not JSON, a key missing or of the wrong type. Edited, truncated or from another version."""


class BundleError(PhiedgeError):
    """The bundle is damaged, unsafe, or cannot run here; the message names the first problem."""


class BenchError(PhiedgeError):
    """The benchmark cannot run (bad options or not a model)."""


class UnsafeModelError(PhiedgeError):
    """The model folder asks the runtime for something phiedge never writes; nothing was loaded."""


class PackageError(PhiedgeError):
    """The folder cannot be packaged."""


class KeyFileError(PhiedgeError):
    """A key file is missing, unreadable, or not a key of the kind asked for."""


class SignatureError(PhiedgeError):
    """A bundle's signature is missing, from another key, malformed, or does not match its manifest."""


class ValidationFailed(PhiedgeError):
    """A metric crossed its threshold; the message names each one and by how much."""


class NotEnforced(PhiedgeError):
    """Nothing was held to a threshold: the numbers were measured, but no verdict was reached.

    Its own exit status (not 0, which means the thresholds were met, nor 1, crossed), so a script that
    gates on `phiedge validate` never reads "not checked" as "passed".
    """

    exit_code = 3


class OutputError(PhiedgeError):
    """The output path cannot be written."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a scheduler's timeout) taken as Ctrl-C: the same cleanup runs (partial outputs
    removed, the Olive child stopped) instead of the process vanishing mid-write."""


class ServeRequestError(PhiedgeError):
    """`phiedge serve`: a request the model cannot answer as asked (the client gets a 400 with this message)."""


class ServerBusy(PhiedgeError):
    """`phiedge serve`: the queue is full (the client gets a 429 with Retry-After)."""
