"""Build the optional gemv shim (kvzoo/gemv_shim.c; see kvzoo/gemv.py). Everything else is in
pyproject.toml.

The shim is a plain C shared library (no Python API), loaded with ctypes before mlx.core. It is
optional: without a C compiler the install still succeeds, prints why, and kvzoo then builds the
shim at first use if a compiler appears later, or keeps one-row products on OpenBLAS's sgemm.
"""

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """build_ext that turns a failed compile into a message instead of a failed install."""

    def run(self):
        try:
            super().run()
        except Exception as error:  # no compiler at all: distutils raises before compiling
            self._skip(error)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as error:
            self._skip(error)

    @staticmethod
    def _skip(error):
        print(f"kvzoo: the optional gemv shim was not built ({error}). kvzoo works without it; "
              "one-row products (decoding) then use OpenBLAS's slower sgemm unless a C compiler "
              "is found at first use (see kvzoo/gemv.py).", file=sys.stderr)


extensions = []
if sys.platform == "linux":  # the shim serves MLX's Linux CPU backend only
    extensions.append(Extension("kvzoo._gemv_shim", ["kvzoo/gemv_shim.c"], optional=True,
                                extra_compile_args=["-O2"]))

setup(ext_modules=extensions, cmdclass={"build_ext": OptionalBuildExt})
