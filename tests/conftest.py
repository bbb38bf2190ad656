"""pytest set-up: the BLAS is chosen before any test imports mlx, and the hypothesis profile.

Helpers shared by test files live in tests/helpers/ (assets, oracles, equivalence scenarios,
tokenizers); test files import from there, never from each other.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

# The BLAS is chosen once per process, before mlx.core is imported, so `zoo` is imported here,
# ahead of every test module: the suite runs on what `import zoo` picks (the system OpenBLAS
# when there is one, which CI installs; KVZOO_BLAS=off for MLX's own). tests/test_blas.py reruns
# the property test on the other one in a fresh interpreter.
import zoo  # noqa: E402,F401  (before any test imports mlx)
import kvzoo.blas  # noqa: E402

import pytest  # noqa: E402


def pytest_report_header(config) -> str:
    return f"kvzoo BLAS: {kvzoo.blas.choice().describe()}"


settings.register_profile(
    "kvzoo",
    derandomize=True,  # the same examples on every run: CI is deterministic in time
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("kvzoo")


@pytest.fixture
def registered():
    """`registered(name, cls)`: register a test-only cache, unregistered after the test."""
    import caches
    from caches.registry import CACHES

    names = []

    def add(name, cls):
        caches.register(name)(cls)
        names.append(name)

    yield add
    for name in names:
        if name in CACHES:
            CACHES.remove(name)
