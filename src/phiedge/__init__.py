"""phiedge: Phi models from a Hugging Face checkpoint to a validated, benchmarked edge bundle."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("phiedge")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"
