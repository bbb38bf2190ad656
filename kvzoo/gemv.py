"""The gemv shim: one-row (and one-column) fp32 products through OpenBLAS's sgemv.

MLX calls `cblas_sgemm` for every fp32 matmul, the decode step's x[1, K] @ W^T included.
OpenBLAS 0.3.21's sgemm reads W at 2.5-5 GB/s when M == 1; its sgemv reads the same matrix at
10-14 GB/s on this machine. kvzoo/gemv_shim.c is a tiny library exporting `cblas_sgemm` that
forwards M == 1 or N == 1 to the real `cblas_sgemv` and everything else to the real sgemm (the
function pointers it is given, so it links no BLAS).

How MLX ends up calling it: libmlx resolves `cblas_sgemm` once, through the global symbol scope,
when `mlx.core` is imported. kvzoo/blas.py opens OpenBLAS privately (RTLD_LOCAL), hands the shim
OpenBLAS's sgemm/sgemv addresses, promotes the shim to the global scope (RTLD_GLOBAL), and only
then promotes OpenBLAS. glibc searches the global scope in the order objects were made global,
so libmlx's `cblas_sgemm` binds to the shim while every other BLAS/LAPACK symbol still binds
to OpenBLAS. `counts()` reads the shim's call counters: the proof that MLX really calls it.

Where the library comes from, first found wins:

    1. kvzoo/_gemv_shim*.so, built by setup.py at install (an optional extension: an install
       without a C compiler still succeeds, without it)
    2. a copy built at first use with the system C compiler ($CC, else cc/gcc/clang) into
       $KVZOO_CACHE or ~/.cache/kvzoo, named by a hash of the source, so an edit rebuilds it
    3. none: one-row products stay on OpenBLAS's sgemm, and `kvzoo info` says why

`KVZOO_GEMV=off` keeps every product on sgemm (the path the tests compare against).
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ENV_VAR = "KVZOO_GEMV"
SOURCE = Path(__file__).with_name("gemv_shim.c")
OFF = ("off", "0", "no", "false", "none")


@dataclass(frozen=True)
class Shim:
    """The loaded shim library and where it came from."""

    handle: ctypes.CDLL
    path: str
    origin: str  # "installed" or "built at first use into ..."


def requested() -> bool:
    """False when KVZOO_GEMV turns the shim off."""
    return os.environ.get(ENV_VAR, "auto").strip().lower() not in OFF


def installed_library() -> Optional[str]:
    """The shim setup.py built into the package folder, if any."""
    found = sorted(glob.glob(str(SOURCE.with_name("_gemv_shim")) + "*.so"))
    return found[0] if found else None


def cache_dir() -> Path:
    root = os.environ.get("KVZOO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kvzoo")
    return Path(root)


def compiler() -> Optional[str]:
    """The C compiler to build the shim with: $CC, else cc, gcc or clang on PATH."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name.split()[0]):
            return name
    return None


def build(target_dir: Optional[Path] = None) -> str:
    """Compile gemv_shim.c into `target_dir` (the cache folder) unless an up-to-date copy is
    there; returns its path. Raises OSError with the reason when it cannot."""
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    target = (target_dir or cache_dir()) / f"libkvzoo_gemv-{digest}.so"
    if target.exists():
        return str(target)
    cc = compiler()
    if cc is None:
        raise OSError("no C compiler found ($CC, cc, gcc, clang)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:  # same filesystem: atomic
        partial = Path(scratch) / target.name
        try:
            done = subprocess.run([*cc.split(), "-O2", "-shared", "-fPIC", "-o", str(partial), str(SOURCE)],
                                  capture_output=True, text=True, timeout=120)
        except subprocess.SubprocessError as error:  # e.g. a compiler that hangs
            raise OSError(f"{cc} failed: {error}") from None
        if done.returncode != 0:
            raise OSError(f"{cc} failed: {done.stderr.strip()[-500:]}")
        os.replace(partial, target)
    return str(target)


def locate() -> tuple[str, str]:
    """(path, origin) of a shim library, building one if needed. Raises OSError if impossible."""
    path = installed_library()
    if path is not None:
        return path, "installed"
    built = build()
    return built, f"built at first use into {Path(built).parent}"


def load(blas: ctypes.CDLL) -> Shim:
    """Load the shim into the global symbol scope, forwarding to `blas` (opened RTLD_LOCAL).

    Must run before `blas` itself is made global and before mlx.core is imported."""
    if not hasattr(blas, "cblas_sgemv"):
        raise OSError("the BLAS does not export cblas_sgemv")
    path, origin = locate()
    handle = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    handle.kvzoo_gemv_shim_init.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    handle.kvzoo_gemv_shim_init.restype = ctypes.c_int
    address = lambda function: ctypes.cast(function, ctypes.c_void_p).value  # noqa: E731
    if not handle.kvzoo_gemv_shim_init(address(blas.cblas_sgemm), address(blas.cblas_sgemv)):
        raise OSError("the shim did not accept the BLAS's sgemm/sgemv")
    return Shim(handle, os.path.realpath(path), origin)


def counts(shim: Shim) -> dict[str, int]:
    """How many cblas_sgemm calls the shim sent to sgemv and to sgemm so far."""
    gemv, gemm = ctypes.c_long(), ctypes.c_long()
    shim.handle.kvzoo_gemv_shim_counts(ctypes.byref(gemv), ctypes.byref(gemm))
    return {"gemv": gemv.value, "gemm": gemm.value}


def set_forwarding(shim: Shim, on: bool) -> None:
    """Turn the forwarding on or off at run time (off: the shim calls sgemm for everything)."""
    shim.handle.kvzoo_gemv_shim_set_forwarding.argtypes = [ctypes.c_int]
    shim.handle.kvzoo_gemv_shim_set_forwarding(1 if on else 0)


def measure_row_product(rows: int = 32000, cols: int = 768, repeats: int = 7) -> dict:
    """GB/s of MLX's one-row fp32 product x[1, cols] @ W[rows, cols]^T (median of `repeats`):
    W is 98 MB at the default shape (the 100M Llama config's tied output head), larger than any
    L2 (a large shared L3 may still hold it). Takes ~0.1-0.3 s."""
    import mlx.core as mx

    w = mx.random.normal((rows, cols), key=mx.random.key(0))
    x = mx.random.normal((1, cols), key=mx.random.key(1))
    mx.eval(w, x)
    mx.eval(x @ w.T)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(x @ w.T)
        times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    return {"row_product_shape": [1, cols, rows], "row_product_gbs": w.nbytes / seconds / 1e9}
