"""Samplers (log-probabilities -> token ids) and logits processors, chosen by name or composed.

    sampler = sampling.make_sampler(temp=0.8, top_p=0.95, seed=0)
    processors = sampling.make_logits_processors(repetition_penalty=1.2)
    sampling.make("top_k", top_k=40, temp=0.7)          # a registered sampler by name
    sampling.make_processor("logit_bias", bias={2: -5})  # a registered processor by name
"""

# Before anything here imports mlx.core: the fast BLAS on Linux CPU (kvkvzoo/blas.py), so that
# importing this package first gives the same matmuls as importing zoo first.
from kvzoo import blas as _blas

_blas.setup()


from .registry import (
    LogitsProcessor,
    Sampler,
    available,
    available_processors,
    get,
    make,
    make_processor,
    register,
    register_processor,
)

from . import processors, samplers  # noqa: E402,F401  (register the built-ins)
from .filters import min_p_filter, top_k_filter, top_p_filter
from .processors import make_logits_processors
from .samplers import greedy_sample, make_sampler

__all__ = [
    "LogitsProcessor",
    "Sampler",
    "available",
    "available_processors",
    "get",
    "greedy_sample",
    "make",
    "make_logits_processors",
    "make_processor",
    "make_sampler",
    "min_p_filter",
    "register",
    "register_processor",
    "top_k_filter",
    "top_p_filter",
]
