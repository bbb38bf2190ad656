"""Plugins: a user's own caches, positional schemes, samplers or families, in a file or a package.

A plugin is any Python module that registers things when imported (`@caches.register(...)`
and friends). Two ways to reach the `kvzoo` commands:

    kvzoo check --plugin my_cache.py --caches mine      # a file (or a dotted module name)
    # pyproject.toml of an installed package:
    [project.entry-points."kvzoo.plugins"]
    mine = "my_package.caches"

Installed plugins (the `kvzoo.plugins` entry-point group) load automatically when a `kvzoo`
command starts (`KVZOO_NO_PLUGINS=1` skips them); `--plugin` adds more, after them. In Python,
importing the module is all it takes; `load(spec)` does it for a file path.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from importlib import metadata
from pathlib import Path
from types import ModuleType

ENTRY_POINT_GROUP = "kvzoo.plugins"
DISABLE_ENV = "KVZOO_NO_PLUGINS"


class PluginError(ValueError):
    """A plugin could not be found or imported (the message names it and why)."""


def load(spec: str) -> ModuleType:
    """Import plugin `spec`: a path to a .py file, or a dotted module name."""
    if not isinstance(spec, str) or not spec:
        raise PluginError(f"a plugin is a .py file path or a module name, got {spec!r}")
    path = Path(spec)
    if spec.endswith(".py") or os.sep in spec or path.exists():
        return _load_file(path)
    try:
        return importlib.import_module(spec)
    except ImportError as error:
        raise PluginError(f"plugin {spec!r}: no such file, and importing it as a module failed: {error}") from None


def _load_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise PluginError(f"plugin file {path} does not exist")
    resolved = path.resolve()
    # One module name per file, so loading the same file twice reuses the module.
    name = f"kvzoo_plugin_{resolved.stem}_{hashlib.sha1(str(resolved).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise PluginError(f"plugin file {path} cannot be imported (is it a Python file?)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[name]
        raise PluginError(f"plugin file {path} failed to import: {type(error).__name__}: {error}") from error
    return module


def installed() -> list[metadata.EntryPoint]:
    """The entry points of installed plugins (group `kvzoo.plugins`)."""
    return sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)


def load_installed() -> list[str]:
    """Import every installed plugin (unless KVZOO_NO_PLUGINS is set); returns their names.

    A plugin that fails to import is an error naming it (set KVZOO_NO_PLUGINS=1 to run
    without installed plugins)."""
    if os.environ.get(DISABLE_ENV, "").strip() not in ("", "0"):
        return []
    names = []
    for entry in installed():
        try:
            entry.load()
        except Exception as error:
            raise PluginError(
                f"installed plugin {entry.name!r} ({entry.value}) failed to import: "
                f"{type(error).__name__}: {error}; set {DISABLE_ENV}=1 to run without installed plugins"
            ) from error
        names.append(entry.name)
    return names
