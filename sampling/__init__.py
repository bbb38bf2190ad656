"""Samplers (log-probabilities -> token ids), chosen by name."""

from .registry import Sampler, available, get, make, register

from . import samplers  # noqa: E402,F401  (register the built-in samplers)
from .samplers import greedy_sample

__all__ = ["Sampler", "available", "get", "greedy_sample", "make", "register"]
