"""Shared test fixtures: locating the real test assets, and hypothesis profiles.

Assets live in ../shared/data (or $KVZOO_DATA). On a user's machine without them, tests that
need them skip with a reason; under CI (CI=true) a missing asset or oracle package fails.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# The BLAS is chosen once per process, before mlx.core is imported, so `zoo` is imported here,
# ahead of every test module: the suite runs on what `import zoo` picks (the system OpenBLAS
# when there is one, which CI installs; KVZOO_BLAS=off for MLX's own). tests/test_blas.py reruns
# the property test on the other one in a fresh interpreter.
import zoo  # noqa: E402,F401  (before any test imports mlx)

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")



def pytest_report_header(config) -> str:
    return f"kvzoo BLAS: {zoo.blas.choice().describe()}"


settings.register_profile(
    "kvzoo",
    derandomize=True,  # the same examples on every run: CI is deterministic in time
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("kvzoo")


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
