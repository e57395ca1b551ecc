"""curate: distributed, reproducible curation of LLM and multimodal training data on Ray."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("curate")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+unknown"
