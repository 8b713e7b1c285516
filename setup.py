"""Wires the cffi extension into the build; everything else is in pyproject.toml."""

import sys

from setuptools import setup

# On other platforms the package installs without the extension and Ring() explains why.
setup(cffi_modules=["build_ffi.py:ffi"] if sys.platform.startswith("linux") else [])
