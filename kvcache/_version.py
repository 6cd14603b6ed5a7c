"""The package version (one place, read by the save-file writer too)."""

__version__ = "0.1.0"
