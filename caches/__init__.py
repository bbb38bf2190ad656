"""KV-cache strategies behind one protocol, chosen by name.

    import caches
    caches.available()   # ['concat', 'h2o', 'kivi', 'preallocated', 'quantized', 'rotating', 'snapkv', 'streaming']
    cache = caches.make("rotating", model, max_size=512, keep=4)
    caches.save("prompt.safetensors", cache)
    cache, metadata = caches.load("prompt.safetensors")

A new strategy subclasses `caches.Cache`, fills its storage hooks (`_append`, `state`, ...) and
registers itself with `@caches.register("name", reference=..., examples=..., exact=...)`; it then
appears in the CLI, the benchmarks, the study and the property test (docs/architecture.md).
"""

# Before anything here imports mlx.core: the fast BLAS on Linux CPU (kvkvzoo/blas.py), so that
# importing this package first gives the same matmuls as importing zoo first.
from kvzoo import blas as _blas

_blas.setup()


from .attention import scaled_dot_product_attention
from .base import Cache, Fetched, Unsupported, ragged_refusal
from .reference import EXACT, Reference
from .registry import Conformance, available, examples, exact_for, get, make, options_of, reference_of, register
from .persistence import load, save

# Built-in strategies register themselves on import.
from . import concat, h2o, kivi, preallocated, quantized, rotating, snapkv, streaming  # noqa: E402,F401
from .quantized import QuantizedReference  # noqa: E402
from .rotating import WindowReference  # noqa: E402

__all__ = [
    "Cache",
    "Conformance",
    "Fetched",
    "Unsupported",
    "Reference",
    "WindowReference",
    "QuantizedReference",
    "EXACT",
    "available",
    "examples",
    "exact_for",
    "get",
    "load",
    "save",
    "make",
    "options_of",
    "reference_of",
    "ragged_refusal",
    "register",
    "scaled_dot_product_attention",
]
