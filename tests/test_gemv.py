"""The gemv shim (kvzoo/gemv_shim.c, kvzoo/gemv.py): its cblas_sgemm computes what sgemm computes
for every layout, and MLX really calls it.

1. The C function directly, against numpy in float64 (the oracle): row- and column-major, every
   transpose pair, M == 1, N == 1 and general shapes, padded leading dimensions, alpha/beta, and
   beta == 0 over an output full of NaNs (BLAS: C is not read). Its counters say which path ran.
2. MLX through the shim, in fresh interpreters with KVZOO_GEMV choosing the path (the choice is
   made once per process, before mlx.core loads): cached and uncached logits agree, the two paths
   agree, `kvzoo info` names the shim as what libmlx's cblas_sgemm is bound to, and the shim's
   counters rose during decoding.
3. No compiler and no installed copy: the fast BLAS stays on, one-row products stay on sgemm, and
   `kvzoo info` says why.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers.assets import IN_CI, ROOT
from kvzoo import blas, gemv

ROW, COL = 101, 102
NO, TRANS = 111, 112
P = ctypes.POINTER(ctypes.c_float)


def require_openblas() -> str:
    path = blas.find_openblas()
    if path is None:
        message = "no system OpenBLAS (apt-get install libopenblas0-pthread)"
        if IN_CI:
            pytest.fail(message + "; CI must install it")
        pytest.skip(message)
    return path


def require_compiler() -> None:
    if gemv.installed_library() is None and gemv.compiler() is None:
        message = "no C compiler and no installed gemv shim"
        if IN_CI:
            pytest.fail(message + "; CI has gcc")
        pytest.skip(message)


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    """A private copy of the shim (RTLD_LOCAL, built into a temp folder), forwarding to a
    private handle on OpenBLAS: independent of what this process's MLX is bound to."""
    library = require_openblas()
    require_compiler()
    real = ctypes.CDLL(library, mode=ctypes.RTLD_LOCAL)
    path = gemv.build(tmp_path_factory.mktemp("shim"))
    handle = ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)
    handle.kvzoo_gemv_shim_init.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    address = lambda f: ctypes.cast(f, ctypes.c_void_p).value  # noqa: E731
    assert handle.kvzoo_gemv_shim_init(address(real.cblas_sgemm), address(real.cblas_sgemv)) == 1
    handle.cblas_sgemm.argtypes = [ctypes.c_int] * 6 + [ctypes.c_float, P, ctypes.c_int, P,
                                                        ctypes.c_int, ctypes.c_float, P, ctypes.c_int]
    handle.cblas_sgemm.restype = None
    return gemv.Shim(handle, path, "test")


def stored(rows: int, cols: int, ld: int, order: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """(buffer, logical matrix): a rows x cols matrix in `order` with leading dimension `ld`."""
    if order == ROW:
        buffer = rng.standard_normal((rows, ld)).astype(np.float32)
        return buffer, buffer[:, :cols]
    buffer = rng.standard_normal((cols, ld)).astype(np.float32)  # column j is buffer[j, :rows]
    return buffer, buffer[:, :rows].T


@settings(max_examples=120, deadline=None, derandomize=True)
@given(order=st.sampled_from([ROW, COL]), transa=st.sampled_from([NO, TRANS]),
       transb=st.sampled_from([NO, TRANS]), shape=st.sampled_from(["m1", "n1", "both1", "general"]),
       sizes=st.tuples(st.integers(1, 40), st.integers(1, 40), st.integers(1, 40)),
       pads=st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 3)),
       alpha=st.sampled_from([1.0, 0.5, -2.0]), beta=st.sampled_from([0.0, 1.0, 0.25]),
       seed=st.integers(0, 2**16))
def test_the_shim_computes_sgemm_for_every_layout(shim, order, transa, transb, shape, sizes, pads,
                                                  alpha, beta, seed):
    m, n, k = sizes
    m = 1 if shape in ("m1", "both1") else m
    n = 1 if shape in ("n1", "both1") else n
    if shape == "general":
        m, n = max(m, 2), max(n, 2)
    rng = np.random.default_rng(seed)
    # op(A) is m x k, op(B) is k x n; A is stored k x m when transposed.
    a_rows, a_cols = (k, m) if transa == TRANS else (m, k)
    b_rows, b_cols = (k, n) if transb == NO else (n, k)
    minor = (lambda r, c: c) if order == ROW else (lambda r, c: r)
    lda, ldb, ldc = minor(a_rows, a_cols) + pads[0], minor(b_rows, b_cols) + pads[1], minor(m, n) + pads[2]
    a_buf, a = stored(a_rows, a_cols, lda, order, rng)
    b_buf, b = stored(b_rows, b_cols, ldb, order, rng)
    c_buf, c = stored(m, n, ldc, order, rng)
    if beta == 0.0:
        c[...] = np.nan  # must not leak: BLAS does not read C when beta == 0
    op_a = a.T if transa == TRANS else a
    op_b = b.T if transb == TRANS else b
    c_before = np.nan_to_num(c.astype(np.float64))
    expected = alpha * (op_a.astype(np.float64) @ op_b.astype(np.float64)) + beta * c_before
    padding_before = c_buf.copy()
    before = gemv.counts(shim)
    shim.handle.cblas_sgemm(order, transa, transb, m, n, k, alpha, a_buf.ctypes.data_as(P), lda,
                            b_buf.ctypes.data_as(P), ldb, beta, c_buf.ctypes.data_as(P), ldc)
    after = gemv.counts(shim)
    scale = np.abs(op_a).astype(np.float64) @ np.abs(op_b).astype(np.float64) * abs(alpha) + abs(beta) * np.abs(c_before)
    assert np.all(np.abs(c - expected) <= 1e-5 * scale + 1e-6), (m, n, k)
    # Only C's m x n entries change; the padding of its leading dimension is left alone.
    untouched = np.ones_like(c_buf, dtype=bool)
    (untouched[:, :n] if order == ROW else untouched[:, :m])[...] = False
    assert np.array_equal(c_buf[untouched], padding_before[untouched], equal_nan=True)
    took_gemv = after["gemv"] - before["gemv"]
    assert took_gemv == (1 if (m == 1 or n == 1) else 0)
    assert after["gemm"] - before["gemm"] == 1 - took_gemv


def test_forwarding_can_be_turned_off(shim):
    x = np.ones((1, 8), np.float32)
    w = np.ones((8, 8), np.float32)
    y = np.zeros((1, 8), np.float32)
    before = gemv.counts(shim)
    gemv.set_forwarding(shim, False)
    try:
        shim.handle.cblas_sgemm(ROW, NO, NO, 1, 8, 8, 1.0, x.ctypes.data_as(P), 8,
                                w.ctypes.data_as(P), 8, 0.0, y.ctypes.data_as(P), 8)
    finally:
        gemv.set_forwarding(shim, True)
    after = gemv.counts(shim)
    assert after["gemm"] - before["gemm"] == 1 and after["gemv"] == before["gemv"]
    assert np.array_equal(y, np.full((1, 8), 8.0, np.float32))


def test_a_failing_compiler_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "false")
    with pytest.raises(OSError, match="false failed"):
        gemv.build(tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind


# In a fresh interpreter: cached vs uncached logits on tiny models (decode steps are one-row
# products), a short greedy decode, then `kvzoo info --json` (which reports the shim's counters).
SCRIPT = r"""
import io, json, contextlib
import zoo
import caches
import mlx.core as mx
from kvzoo import blas, gemv
from zoo.cli import main

shim = blas.shim()
out = {"logits": {}, "max_diff": {}, "tokens": {}}
before = gemv.counts(shim) if shim else None
for family in ("gpt2", "llama"):
    model = zoo.build(family, preset="tiny", seed=3)
    tokens = mx.random.randint(0, model.config.vocab_size, (1, 24), key=mx.random.key(7))
    full = model(tokens)
    cache = caches.make("preallocated", model)
    parts = [model(tokens[:, :20], cache)] + [model(tokens[:, i:i + 1], cache) for i in range(20, 24)]
    out["max_diff"][family] = mx.abs(mx.concatenate(parts, axis=1) - full).max().item()
    out["logits"][family] = full[0, -4:].tolist()
    out["tokens"][family] = [t for t, _ in zoo.generate_step(model, tokens[0].tolist(), max_tokens=8)]
out["decode_calls"] = ({k: gemv.counts(shim)[k] - before[k] for k in before} if shim else None)
buffer = io.StringIO()
with contextlib.redirect_stdout(buffer):
    out["status"] = main(["info", "--json"])
out["info"] = json.loads(buffer.getvalue())["blas"]
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


@pytest.fixture(scope="module")
def on_sgemm() -> dict:
    require_openblas()
    return run_script(KVZOO_BLAS="auto", KVZOO_GEMV="off")


def test_with_the_shim_mlx_calls_it_and_the_outputs_agree(on_sgemm):
    library = require_openblas()
    require_compiler()
    result = run_script(KVZOO_BLAS="auto", KVZOO_GEMV="auto")
    info = result["info"]
    assert result["status"] == 0 and info["fast"] is True
    assert info["library"] == os.path.realpath(library)
    assert info["gemv_shim"] and info["bound"] == info["gemv_shim"]  # libmlx's GOT points at it
    # Decoding made one-row products, and every one of them came through the shim to sgemv;
    # the prefill chunk's 20-row products went to sgemm.
    assert result["decode_calls"]["gemv"] > 0 and result["decode_calls"]["gemm"] > 0
    assert info["gemv_shim_calls"]["gemv"] >= result["decode_calls"]["gemv"]
    assert info["row_product_gbs"] > 0 and info["mlx_sgemm_gflops"] > 0
    for family in ("gpt2", "llama"):
        assert result["max_diff"][family] <= 1e-4
        fast = np.array(result["logits"][family])
        reference = np.array(on_sgemm["logits"][family])
        assert np.abs(fast - reference).max() <= 1e-4
        assert result["tokens"][family] == on_sgemm["tokens"][family]


def test_without_the_shim_libmlx_is_bound_to_openblas(on_sgemm):
    library = require_openblas()
    info = on_sgemm["info"]
    assert info["fast"] is True and info["gemv_shim"] is None
    assert info["bound"] == os.path.realpath(library)
    assert "KVZOO_GEMV=off" in info["gemv_how"] and "gemv_shim_calls" not in info
    assert on_sgemm["max_diff"]["gpt2"] <= 1e-4 and on_sgemm["max_diff"]["llama"] <= 1e-4


def test_without_a_compiler_the_fast_blas_stays_and_says_why(tmp_path):
    library = require_openblas()
    code = ("from kvzoo import gemv; gemv.installed_library = lambda: None\n"
            "import zoo, json, kvzoo.blas as b\n"
            "c = b.choice(); print(json.dumps([c.fast, c.gemv, c.gemv_how, b.bound_library(), c.describe()]))")
    done = run_python(code, KVZOO_BLAS="auto", KVZOO_GEMV="auto", CC="no-such-compiler-here",
                      PATH=str(tmp_path), KVZOO_CACHE=str(tmp_path / "cache"))
    assert done.returncode == 0, done.stderr
    fast, shim_path, how, bound, described = json.loads(done.stdout)
    assert fast and shim_path is None and bound == os.path.realpath(library)
    assert "no C compiler" in how and "one-row products: sgemm" in described
