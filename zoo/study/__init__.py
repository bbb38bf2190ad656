"""`zoo.study`: what each cache does to a real model, in numbers (and pictures).

Modules, one idea each: spec (cache SPEC strings against the registry), perplexity (teacher
forcing through a cache in chunks), compare (KL / top-1 / delta perplexity against the exact
cache, in lockstep), needle (passkey retrieval), cost (bytes and tokens/s against context),
runner (the grid, study.json), plots (PNGs, needs matplotlib).

The package itself is callable: `zoo.study(models, text, caches, out=..., quick=...)` is
`zoo.study.runner.study`, and `zoo.study.spec` etc. stay reachable as modules.
"""

import sys
import types

from .runner import Settings, study  # noqa: E402
from .spec import CacheSpec, expand, parse, parse_list  # noqa: E402

__all__ = ["CacheSpec", "Settings", "expand", "parse", "parse_list", "study"]


class _CallableModule(types.ModuleType):
    """This package, callable as `zoo.study(...)`."""

    def __call__(self, *args, **kwargs):
        return study(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
