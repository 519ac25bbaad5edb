"""Pacemaker: an AI agent core between applications and LLM providers."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pacemaker")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
