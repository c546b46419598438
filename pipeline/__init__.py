"""kosmos-annotate: Kosmos-2 grounded captions for image datasets, on OpenVINO.

From Python: `from pipeline import Annotator, annotate` (pipeline/api.py)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("kosmos-annotate")
except PackageNotFoundError:  # a checkout that is not installed
    __version__ = "unknown"


def __getattr__(name: str):
    """The API is imported when first asked for: the commands start without it."""
    if name in ("Annotator", "annotate"):
        from pipeline import api

        return getattr(api, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


__all__ = ["Annotator", "annotate", "__version__"]
