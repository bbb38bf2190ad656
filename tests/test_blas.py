"""The fast BLAS path (kvzoo/blas.py): the model gives the same outputs with and without it, and
`kvzoo info` names the library that libmlx's sgemm is really bound to.

Each case runs in a fresh interpreter, because the choice is made once per process, before
mlx.core is imported. Under CI the system OpenBLAS must be present (.ci/run installs
libopenblas0-pthread), so the fast path is always tested there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers.assets import IN_CI, ROOT
from kvzoo import blas

# Cached vs uncached logits (the property the whole suite rests on), on prompts long enough that
# prefill goes through sgemm, then `kvzoo info --json` from the same process.
SCRIPT = r"""
import io, json, contextlib
import zoo
import caches
import mlx.core as mx
from zoo.cli import main

out = {"logits": {}, "max_diff": {}}
for family in ("gpt2", "llama"):
    model = zoo.build(family, preset="tiny", seed=3)
    tokens = mx.random.randint(0, model.config.vocab_size, (1, 40), key=mx.random.key(7))
    full = model(tokens)
    cache = caches.make("preallocated", model)
    parts = [model(tokens[:, :33], cache), model(tokens[:, 33:34], cache), model(tokens[:, 34:], cache)]
    cached = mx.concatenate(parts, axis=1)
    out["max_diff"][family] = mx.abs(cached - full).max().item()
    out["logits"][family] = full[0, -1].tolist()
buffer = io.StringIO()
with contextlib.redirect_stdout(buffer):
    status = main(["info", "--json"])
out["status"] = status
out["info"] = json.loads(buffer.getvalue())
print(json.dumps(out))
"""


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=environment, cwd=ROOT, timeout=300)


def run_script(**env: str) -> dict:
    done = run_python(SCRIPT, **env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def require_openblas() -> str:
    path = blas.find_openblas()
    if path is None:
        message = "no system OpenBLAS (apt-get install libopenblas0-pthread)"
        if IN_CI:
            pytest.fail(message + "; CI must install it")
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def without_fast_blas() -> dict:
    return run_script(KVZOO_BLAS="off")


def test_without_fast_blas_the_cache_matches_the_uncached_model(without_fast_blas):
    result = without_fast_blas
    assert result["max_diff"]["gpt2"] <= 1e-4 and result["max_diff"]["llama"] <= 1e-4
    info = result["info"]["blas"]
    assert result["status"] == 0
    assert info["fast"] is False and "KVZOO_BLAS=off" in info["how"]
    assert info["bound"] == os.path.realpath(blas.bundled_blas())  # what libmlx really calls


def test_with_fast_blas_the_cache_matches_and_outputs_agree(without_fast_blas):
    library = require_openblas()
    result = run_script(KVZOO_BLAS="auto")
    assert result["max_diff"]["gpt2"] <= 1e-4 and result["max_diff"]["llama"] <= 1e-4
    info = result["info"]["blas"]
    assert info["fast"] is True
    # libmlx's sgemm is bound to the gemv shim when it is active (tests/test_gemv.py), else OpenBLAS
    assert info["bound"] == (info["gemv_shim"] or os.path.realpath(library))
    assert info["library"] == os.path.realpath(library)
    assert "openblas" in info["library"].lower() and info["threads"] >= 1
    for family in ("gpt2", "llama"):  # same logits, whichever BLAS did the matmuls
        fast, reference = result["logits"][family], without_fast_blas["logits"][family]
        assert max(abs(a - b) for a, b in zip(fast, reference)) <= 1e-4


def test_a_library_path_can_be_chosen():
    library = require_openblas()
    done = run_python("import zoo, kvzoo.blas, json; c = kvzoo.blas.choice(); "
                      "print(json.dumps([c.fast, c.how, kvzoo.blas.bound_library()]))",
                      KVZOO_BLAS=library, KVZOO_GEMV="off")
    assert done.returncode == 0, done.stderr
    fast, how, bound = json.loads(done.stdout)
    assert fast and how == f"KVZOO_BLAS={library}" and bound == os.path.realpath(library)


def test_mlx_imported_first_is_reported_not_hidden():
    done = run_python("import mlx.core, zoo, kvzoo.blas, json; c = kvzoo.blas.choice(); "
                      "print(json.dumps([c.fast, c.how, kvzoo.blas.bound_library()]))",
                      KVZOO_BLAS="auto")
    assert done.returncode == 0, done.stderr
    fast, how, bound = json.loads(done.stdout)
    assert not fast and "mlx imported before zoo" in how
    assert bound == os.path.realpath(blas.bundled_blas())
    if blas.find_openblas() is not None:  # a fast BLAS was there: the user is told, not left slow
        assert "RuntimeWarning: kvzoo: mlx.core was imported before zoo" in done.stderr
        assert "import zoo first" in done.stderr


def test_a_bad_library_path_warns_and_keeps_the_bundled_blas(tmp_path):
    bogus = tmp_path / "libnotblas.so"
    bogus.write_bytes(b"not a shared library")
    done = run_python("import warnings; warnings.simplefilter('always'); import zoo, kvzoo.blas, json; "
                      "c = kvzoo.blas.choice(); print(json.dumps([c.fast, c.how]))",
                      KVZOO_BLAS=str(bogus))
    assert done.returncode == 0, done.stderr
    fast, how = json.loads(done.stdout)
    assert not fast and "loading failed" in how
    assert "could not load BLAS" in done.stderr


def test_the_property_test_passes_on_the_other_blas():
    """The heart of the suite, rerun in a fresh interpreter on the BLAS this process does not
    use (MLX's bundled one when OpenBLAS is active, as in CI; OpenBLAS otherwise, when present):
    every cache, hypothesis examples and grid, and the documented example caches (the float16
    one must pass under either BLAS with no numerics of its own)."""
    other = "off" if blas.choice().fast else require_openblas()
    environment = {**os.environ, "KVZOO_BLAS": other}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-W", "error",
         "tests/test_equivalence.py",
         "tests/test_extending.py::test_documented_example_caches_pass_the_property_checks"],
        capture_output=True, text=True, env=environment, cwd=ROOT, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    header = next(line for line in done.stdout.splitlines() if line.startswith("kvzoo BLAS:"))
    expected = "MLX's bundled BLAS" if other == "off" else f"fast BLAS: {os.path.realpath(other)}"
    assert header.startswith(f"kvzoo BLAS: {expected}"), header
    assert " passed" in done.stdout


def test_the_property_test_passes_on_the_other_one_row_path():
    """The property test again on OpenBLAS with the other one-row path: plain sgemm when this
    process's one-row products go through the gemv shim (the default with a compiler, as in CI),
    the shim otherwise (tests/test_gemv.py checks the shim itself against numpy)."""
    library = require_openblas()
    if not blas.choice().fast:
        pytest.skip("this process runs on MLX's bundled BLAS; the OpenBLAS run covers the shim")
    other = "off" if blas.choice().gemv else "auto"
    environment = {**os.environ, "KVZOO_BLAS": library, "KVZOO_GEMV": other}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-W", "error",
         "tests/test_equivalence.py"],
        capture_output=True, text=True, env=environment, cwd=ROOT, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    header = next(line for line in done.stdout.splitlines() if line.startswith("kvzoo BLAS:"))
    expected = "one-row products: sgemm (KVZOO_GEMV=off)" if other == "off" else "sgemv via the gemv shim"
    assert expected in header, header
    assert " passed" in done.stdout
