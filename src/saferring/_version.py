"""The package version; build_ffi.py stamps it into the compiled module."""

__version__ = "0.1.0"
