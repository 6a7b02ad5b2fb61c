"""jlora's version, read from the installed package's metadata (pyproject.toml)."""

from importlib import metadata

try:
    VERSION = metadata.version("jlora")
except metadata.PackageNotFoundError:  # a source tree that is not installed
    VERSION = "unknown"
