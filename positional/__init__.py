"""Positional schemes behind one protocol, chosen by name: learned, rope, alibi.

A scheme overrides only the hook it needs: `embed` (added to token embeddings), `rotate`
(applied to queries and keys) or `bias` (added to attention scores).
"""

# Before anything here imports mlx.core: the fast BLAS on Linux CPU (kvkvzoo/blas.py), so that
# importing this package first gives the same matmuls as importing zoo first.
from kvzoo import blas as _blas

_blas.setup()


from .base import Positional
from .registry import available, get, make, register

from . import alibi, learned, rope  # noqa: E402,F401  (register the built-in schemes)
from .alibi import alibi_slopes

__all__ = ["Positional", "alibi_slopes", "available", "get", "make", "register"]
