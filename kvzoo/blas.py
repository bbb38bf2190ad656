"""A fast BLAS for MLX on Linux CPU.

MLX's Linux CPU wheels link the reference (netlib) BLAS, which does a 512x768x768 fp32 matmul
at about 5 GFLOP/s; OpenBLAS does it at about 100 on the same two cores. MLX calls
`cblas_sgemm` through the dynamic linker, and Python loads extension modules with RTLD_NOW, so
whichever library is first in the global symbol scope when `mlx.core` is imported serves every
matmul for the life of the process. Loading OpenBLAS with RTLD_GLOBAL *before* that import makes
MLX use it; loading it after changes nothing.

`import zoo` does this first thing (see zoo/__init__.py). Choose with the environment variable
`KVZOO_BLAS`:

    unset or "auto"   find OpenBLAS on the system (Debian: apt-get install libopenblas0-pthread)
    "off"             keep the BLAS MLX ships with
    a path            load that library (it must export cblas_sgemm)

With a fast BLAS, one-row products (decode) also go through its sgemv via kvzoo's gemv shim
(kvzoo/gemv.py; `KVZOO_GEMV=off` keeps them on sgemm).

`caches`, `positional` and `sampling` never import `zoo`, so a program that imports one of them
(or `mlx.core`, or `mlx_lm`) before `zoo` gets MLX's own BLAS; `choice()` then says so
("mlx imported before zoo") instead of pretending. Results are the same either way up to float
rounding (both are IEEE fp32 sgemm; summation order differs).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import importlib.util
import math
import os
import re
import struct
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from kvzoo import gemv

ENV_VAR = "KVZOO_BLAS"
THREADS_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")


@dataclass(frozen=True)
class BlasChoice:
    """Which BLAS serves MLX's matrix multiplies in this process, and why."""

    fast: bool  # a fast BLAS was loaded globally before mlx.core
    library: Optional[str]  # path of the library serving cblas_sgemm (None: unknown)
    how: str  # how it was chosen, for people
    threads: Optional[int] = None  # OpenBLAS threads, when known
    config: Optional[str] = None  # OpenBLAS's build string (version, core type)
    gemv: Optional[str] = None  # path of the gemv shim serving cblas_sgemm, when active
    gemv_how: str = "no fast BLAS"  # why the shim is or is not active, for people

    def describe(self) -> str:
        name = "fast BLAS" if self.fast else "MLX's bundled BLAS"
        parts = [f"{name}: {self.library or 'unknown library'}", self.how]
        if self.config:
            parts.append(self.config.strip())
        if self.threads:
            parts.append(f"{self.threads} thread{'s' if self.threads > 1 else ''}")
        if self.fast:
            parts.append(f"one-row products: {'sgemv via the gemv shim' if self.gemv else 'sgemm'}"
                         f" ({self.gemv_how})")
        return " | ".join(parts)


_choice: Optional[BlasChoice] = None
_handle: Optional[ctypes.CDLL] = None
_shim: Optional[gemv.Shim] = None


def choice() -> BlasChoice:
    """The BLAS decision for this process (made by `setup`, which `import zoo` calls)."""
    return _choice if _choice is not None else setup()


def setup() -> BlasChoice:
    """Load a fast BLAS globally if allowed and possible; idempotent. Never raises."""
    global _choice, _handle, _shim
    if _choice is not None:
        return _choice
    request = os.environ.get(ENV_VAR, "auto").strip()
    if sys.platform != "linux":
        _choice = BlasChoice(False, None, "not Linux: MLX uses the platform's BLAS (Accelerate on macOS)")
        return _choice
    if request.lower() in ("off", "0", "none", "no", "false", "reference"):
        _choice = BlasChoice(False, bundled_blas(), f"{ENV_VAR}={request}")
        return _choice
    if "mlx.core" in sys.modules:
        _choice = BlasChoice(
            False, bundled_blas(),
            "mlx imported before zoo: MLX's matmuls are bound to its own BLAS for this process; "
            "import zoo before mlx (or mlx_lm, caches, positional, sampling) to use a fast BLAS",
        )
        if find_openblas() is not None:  # a fast BLAS was there to use: say so, once
            warnings.warn("kvzoo: mlx.core was imported before zoo, so MLX's matmuls run on its "
                          "bundled reference BLAS in this process (a training step measured 3.6x "
                          "slower, docs/training.md); import zoo first to use OpenBLAS",
                          RuntimeWarning, stacklevel=3)
        return _choice
    if request.lower() in ("", "auto", "on", "1", "yes", "true", "openblas"):
        path, how = find_openblas(), "found on the system"
        if path is None:
            _choice = BlasChoice(
                False, bundled_blas(),
                "no OpenBLAS found (Debian/Ubuntu: apt-get install libopenblas0-pthread; "
                f"or set {ENV_VAR}=/path/to/libopenblas.so)",
            )
            return _choice
    else:
        path, how = request, f"{ENV_VAR}={request}"
    threads = _default_threads()
    try:
        _handle, _shim, gemv_how = _load_global(path, threads)
    except OSError as error:
        warnings.warn(f"kvzoo: could not load BLAS {path!r} ({error}); using MLX's bundled BLAS",
                      RuntimeWarning, stacklevel=2)
        _choice = BlasChoice(False, bundled_blas(), f"{how}, but loading failed: {error}")
        return _choice
    _choice = BlasChoice(True, _library_path(_handle, path), how, _openblas_threads(_handle),
                         _openblas_config(_handle), _shim.path if _shim else None, gemv_how)
    return _choice


def _load_global(path: str, threads: Optional[int]) -> tuple[ctypes.CDLL, Optional[gemv.Shim], str]:
    """dlopen `path` RTLD_GLOBAL after checking it exports cblas_sgemm, with the gemv shim
    (kvzoo/gemv.py) made global before it when allowed and possible.
    Returns (the library, the shim or None, why the shim is or is not active)."""
    local = ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)
    if not hasattr(local, "cblas_sgemm"):
        raise OSError(f"{path} does not export cblas_sgemm, so it is not a CBLAS library")
    if threads is not None and not any(v in os.environ for v in THREADS_ENV):
        setter = getattr(local, "openblas_set_num_threads", None)
        if setter is not None:
            setter.argtypes = [ctypes.c_int]
            setter(threads)
    shim, gemv_how = None, f"{gemv.ENV_VAR}=off"
    if gemv.requested():
        try:
            shim = gemv.load(local)
            gemv_how = shim.origin
        except OSError as error:
            gemv_how = (f"gemv shim unavailable: {error}; one-row products use sgemm "
                        "(install a C compiler, or reinstall kvzoo with one)")
    # A second dlopen with RTLD_GLOBAL promotes the loaded library into the global scope, so
    # libmlx's cblas_sgemm resolves to it when mlx.core is imported (to the shim instead when
    # the shim was made global first: the global scope is searched in promotion order).
    return ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL), shim, gemv_how


def shim() -> Optional[gemv.Shim]:
    """The gemv shim serving libmlx's cblas_sgemm in this process, or None."""
    choice()
    return _shim


def find_openblas() -> Optional[str]:
    """Path (or soname) of a system OpenBLAS, without hard-coded machine paths, or None."""
    for name in ("openblas", "openblasp", "openblaso"):
        found = ctypes.util.find_library(name)  # ldconfig cache, then the compiler's search path
        if found:
            return _ldconfig_paths().get(found, found)
    # Debian's alternatives may provide OpenBLAS only as libblas.so.3; accept it if it is.
    blas = _ldconfig_paths().get("libblas.so.3")
    if blas and "openblas" in os.path.realpath(blas):
        return blas
    return None


def _ldconfig_paths() -> dict[str, str]:
    """soname -> path from the dynamic linker's cache (`ldconfig -p`), for this architecture."""
    for ldconfig in ("ldconfig", "/sbin/ldconfig", "/usr/sbin/ldconfig"):
        try:
            out = subprocess.run([ldconfig, "-p"], capture_output=True, text=True, timeout=10,
                                 env={**os.environ, "LC_ALL": "C"}).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        paths: dict[str, str] = {}
        arch = "x86-64" if sys.maxsize > 2**32 and os.uname().machine == "x86_64" else ""
        for line in out.splitlines():
            match = re.match(r"\s*(\S+) \(([^)]*)\) => (\S+)", line)
            if match and (not arch or arch in match.group(2)):
                paths.setdefault(match.group(1), match.group(3))
        return paths
    return {}


def _default_threads() -> Optional[int]:
    """CPUs this process may really use: affinity mask and cgroup quota, whichever is fewer."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cpus


def _openblas_threads(handle: ctypes.CDLL) -> Optional[int]:
    getter = getattr(handle, "openblas_get_num_threads", None)
    if getter is None:
        return None
    getter.restype = ctypes.c_int
    return int(getter())


def _openblas_config(handle: ctypes.CDLL) -> Optional[str]:
    getter = getattr(handle, "openblas_get_config", None)
    if getter is None:
        return None
    getter.restype = ctypes.c_char_p
    return getter().decode(errors="replace")


def _library_path(handle: ctypes.CDLL, fallback: str) -> str:
    """The file the dynamic linker loaded for `handle` (dladdr on its cblas_sgemm)."""
    found = _dladdr(ctypes.cast(handle.cblas_sgemm, ctypes.c_void_p).value)
    return os.path.realpath(found[0]) if found else fallback


def bundled_blas() -> Optional[str]:
    """Path of the BLAS shipped inside the MLX wheel (found without importing mlx.core)."""
    spec = importlib.util.find_spec("mlx")
    roots = list(spec.submodule_search_locations or []) if spec else []
    for root in roots:
        site = Path(root).parent
        for pattern in ("mlx_cpu.libs/libblas*.so*", "mlx.libs/libblas*.so*", "mlx/lib/libblas*.so*"):
            found = sorted(glob.glob(str(site / pattern)))
            if found:
                return found[0]
    return None


def bound_library(symbol: str = "cblas_sgemm") -> Optional[str]:
    """The library that MLX's call to `symbol` really lands in, read from libmlx's GOT.

    Finds libmlx's relocation for `symbol` in its ELF file, reads the resolved address from the
    loaded image and asks the dynamic linker (dladdr) which file holds it. Exact and cheap;
    None where it cannot tell (not Linux/ELF64, mlx not loaded, statically linked BLAS).
    """
    if sys.platform != "linux" or "mlx.core" not in sys.modules:
        return None
    try:
        libmlx = next((line.split(None, 5)[5] for line in Path("/proc/self/maps").read_text()
                       .splitlines() if line.rstrip().endswith("/libmlx.so")), None)
        if libmlx is None:
            return None
        got_offset, exported = _elf_relocation(libmlx.strip(), symbol)
        if got_offset is None or exported is None:
            return None
        info = _dladdr(ctypes.cast(getattr(ctypes.CDLL(libmlx.strip()), exported),
                                   ctypes.c_void_p).value)
        if info is None:
            return None
        target = ctypes.c_void_p.from_address(info[1] + got_offset).value
        found = _dladdr(target)
        return os.path.realpath(found[0]) if found else None
    except (OSError, ValueError, IndexError, AttributeError, struct.error):
        return None


def _elf_relocation(path: str, symbol: str) -> tuple[Optional[int], Optional[str]]:
    """(GOT address of `symbol` relative to the load base, one exported function's name)."""
    data = Path(path).read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:  # ELF64, little-endian
        return None, None
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    dynsym = next(s for s in sections if s[1] == 11)  # SHT_DYNSYM
    strtab = sections[dynsym[6]]

    def symbol_at(index: int) -> tuple[str, int, int]:
        name, info, _, shndx, value, _ = struct.unpack_from("<IBBHQQ", data, dynsym[4] + 24 * index)
        start = strtab[4] + name
        return data[start:data.index(b"\0", start)].decode(), info, shndx

    exported = None
    for index in range(1, dynsym[5] // 24):
        name, info, shndx = symbol_at(index)
        if shndx != 0 and info & 0xF == 2 and name:  # a defined function
            exported = name
            break
    for section in sections:
        if section[1] != 4:  # SHT_RELA
            continue
        for at in range(section[4], section[4] + section[5], 24):
            offset, info, _ = struct.unpack_from("<QQq", data, at)
            if info >> 32 and symbol_at(info >> 32)[0] == symbol:
                return offset, exported
    return None, exported


def _dladdr(address: Optional[int]) -> Optional[tuple[str, int]]:
    """(file name, load base) of the loaded object holding `address`, or None."""

    class DlInfo(ctypes.Structure):
        _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                    ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]

    if not address:
        return None
    dladdr = ctypes.CDLL(None).dladdr
    dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(DlInfo)]
    info = DlInfo()
    if not dladdr(address, ctypes.byref(info)) or not info.dli_fname:
        return None
    return info.dli_fname.decode(), info.dli_fbase or 0


def measure_sgemm(n: int = 512, repeats: int = 5) -> dict:
    """MLX's fp32 matmul speed (GFLOP/s, best of `repeats`, n x n x n) and the library its
    cblas_sgemm is bound to (`bound_library`). A 512^3 product costs ~1.5 ms on OpenBLAS
    (2 cores) and ~45 ms on the reference BLAS.
    """
    import mlx.core as mx

    a = mx.random.normal((n, n), key=mx.random.key(0))
    b = mx.random.normal((n, n), key=mx.random.key(1))
    mx.eval(a, b)
    mx.eval(a @ b)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(a @ b)
        times.append(time.perf_counter() - start)
    return {"n": n, "mlx_sgemm_gflops": 2.0 * n**3 / min(times) / 1e9,
            "served_by": bound_library(), **gemv.measure_row_product()}
