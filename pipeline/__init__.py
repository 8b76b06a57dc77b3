"""Teacher side of genrecal: run a large VLM once and write the teacher cache."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("genrecal")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"
