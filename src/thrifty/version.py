"""The package version, importable from every layer without importing the package root's API."""

__version__ = "0.1.0"
