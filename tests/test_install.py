"""The project installs as a wheel with every package in it (not only as an editable checkout).

An editable install finds every subpackage on disk, so a subpackage missing from pyproject's
package list would only fail for users who `pip install .`. This builds the wheel, checks it
holds every package folder of the checkout, and imports every module from the unpacked wheel
in a fresh interpreter whose working directory is not the checkout.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

from helpers.assets import ROOT
from kvzoo import gemv

TOP_PACKAGES = ("zoo", "caches", "positional", "sampling", "kvzoo")


def source_packages() -> set[str]:
    """Every folder with an __init__.py under the top-level packages, as dotted names."""
    found = set()
    for top in TOP_PACKAGES:
        for init in (ROOT / top).rglob("__init__.py"):
            found.add(".".join(init.parent.relative_to(ROOT).parts))
    return found


def test_the_wheel_holds_and_imports_every_package(tmp_path):
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
         "-q", "-w", str(tmp_path / "dist")],
        capture_output=True, text=True, timeout=300,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("kvzoo-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        archive.extractall(tmp_path / "site")
    in_wheel = {name.rsplit("/", 1)[0].replace("/", ".") for name in names if name.endswith("/__init__.py")}
    assert source_packages() <= in_wheel, f"missing from the wheel: {sorted(source_packages() - in_wheel)}"
    # The optional gemv shim (setup.py) is built where a compiler is, and its source always ships
    # for the build-at-first-use fallback (kvzoo/gemv.py).
    assert "kvzoo/gemv_shim.c" in names
    if sys.platform == "linux" and gemv.compiler() is not None:
        assert any(name.startswith("kvzoo/_gemv_shim") and name.endswith(".so") for name in names), names

    modules = sorted(
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for top in TOP_PACKAGES for path in (ROOT / top).rglob("*.py")
        if path.name != "__main__.py"
    )
    script = (
        "import importlib, json, sys\n"
        "import zoo\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print(json.dumps(sorted({m.__file__.split('/site/')[0] for n, m in sys.modules.items()\n"
        f"    if n.split('.')[0] in {TOP_PACKAGES!r} and getattr(m, '__file__', None)}})))\n"
    )
    env = {"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin", "KVZOO_BLAS": "off"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [str(tmp_path)], "modules were imported from outside the wheel"
