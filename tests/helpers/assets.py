"""Locating the real test assets and the optional oracle packages.

Assets live in ../shared/data (or $KVZOO_DATA). On a user's machine without them, tests that
need them skip with a reason; under CI (CI=true) a missing asset or oracle package fails.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]  # the project root
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def data_dir() -> Path:
    return Path(os.environ.get("KVZOO_DATA", ROOT.parent / "shared" / "data"))


def require_asset(relative: str) -> Path:
    """Path of a test asset; skip (or fail under CI) if it is missing."""
    path = data_dir() / relative
    if not path.exists():
        message = f"test asset {path} not found (set KVZOO_DATA to the shared data folder)"
        if IN_CI:
            pytest.fail(message + "; CI must have it")
        pytest.skip(message)
    return path


def require_module(name: str):
    """Import an optional oracle package; skip (or fail under CI) if it is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        message = f"oracle package {name!r} is not installed ({error}); pip install -e '.[oracle]'"
        if IN_CI:
            pytest.fail(message + "; CI must install it")
        pytest.skip(message)
