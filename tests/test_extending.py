"""A user's own cache: registering it is enough for the property test, the conformance kit, the
life-cycle checks and `kvzoo check` to cover it, from a file or an installed plugin; a cache that
breaks its contract is caught by each of them.

The documented example caches (docs/examples/*.py: exact, window, rounding) are run here, so
the docs cannot drift from what works.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap

import pytest

import caches
from caches import conformance
from caches.registry import CACHES
from helpers.assets import ROOT
from helpers.equivalence import run_scenario
from helpers.lifecycle import check_failed_update, check_save_load, check_trim
from helpers.user_caches import ForgetfulCache, LyingOrderCache, NewestFirstCache, forget_plugin
from kvzoo import plugins
from zoo.cli import main
from zoo.cli.check import check_pairings

EXAMPLES_DIR = ROOT / "docs" / "examples"
# file -> (registered name, most lines, most protocol names a writer has to know)
DOCUMENTED = {
    "list_cache.py": ("list", 40, 8),
    "last_n_cache.py": ("last-n", 60, 11),
    "half_cache.py": ("half", 60, 11),
}


@pytest.fixture
def example():
    """`example(file)`: load a documented example cache as a plugin; unregistered afterwards."""
    loaded = []

    def load(file):
        name = DOCUMENTED[file][0]
        if name in CACHES:  # a previous test's registration of the same file
            CACHES.remove(name)
        module = plugins.load(str(EXAMPLES_DIR / file))
        sys.modules.pop(module.__name__, None)  # the next load re-registers from the file
        loaded.append(name)
        return name

    yield load
    for name in loaded:
        if name in CACHES:
            CACHES.remove(name)


def scenario(cache_name, scheme, family="llama", n_kv_heads=2, options=None):
    return dict(family=family, cache=cache_name, options=options or {}, prompt_len=10, decode=6,
                chunks=[4, 1, 7, 1, 1, 1, 1], prefill_step=3, seed=5,
                config=dict(positional=scheme, n_heads=4, n_kv_heads=n_kv_heads, head_dim=16,
                            n_layers=2, d_model=32, vocab_size=50, d_ff=32, max_positions=64,
                            init_std=0.1))


def protocol_names(path) -> set[str]:
    """What a reader must know of kvzoo's protocol to write this file: the `caches.` names it
    uses, the Cache/Reference hooks it defines, and the base attributes it reads (`self.offset`)."""
    tree = ast.parse(path.read_text())
    names = {n.attr for n in ast.walk(tree)
             if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "caches"}
    hooks = set(vars(caches.Cache)) | set(vars(caches.Reference))
    for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
        names |= {f.name for f in cls.body if isinstance(f, ast.FunctionDef) and f.name in hooks}
    names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
              and isinstance(n.value, ast.Name) and n.value.id == "self" and n.attr in ("offset",)}
    return names


@pytest.mark.parametrize("file", sorted(DOCUMENTED))
def test_documented_example_caches_are_one_small_file(file):
    _, max_lines, max_names = DOCUMENTED[file]
    path = EXAMPLES_DIR / file
    assert len(path.read_text().splitlines()) <= max_lines
    names = protocol_names(path)
    assert len(names) <= max_names, sorted(names)
    assert "_append" in names and "register" in names


@pytest.mark.parametrize("scheme", ["learned", "rope", "alibi"])
@pytest.mark.parametrize("file", sorted(DOCUMENTED))
def test_documented_example_caches_pass_the_property_checks(example, file, scheme):
    name = example(file)
    for options in caches.examples(name, head_dim=16, seq_len=17):
        for n_kv_heads in (4, 1):
            run_scenario(scenario(name, scheme, n_kv_heads=n_kv_heads, options=options))


@pytest.mark.parametrize("file", sorted(DOCUMENTED))
def test_documented_example_caches_pass_the_life_cycle_checks(example, file, tmp_path):
    import zoo

    name = example(file)
    model = zoo.build("llama", preset="tiny", positional="alibi", n_kv_heads=2, seed=11)
    for i, options in enumerate(caches.examples(name, head_dim=32, seq_len=24)):
        trimmed = check_trim(model, name, options)
        assert trimmed == (name != "last-n")  # what each one says it can do
        (tmp_path / str(i)).mkdir()
        assert check_save_load(model, name, options, tmp_path / str(i))
        check_failed_update(model, name, options)


def test_kvzoo_check_covers_a_plugin_file(capsys):
    status = main(["check", "--plugin", str(EXAMPLES_DIR / "half_cache.py"), "--caches", "half",
                   "--positional", "rope", "alibi"])
    out = capsys.readouterr().out
    assert status == 0, out
    rows = [line for line in out.splitlines() if " half " in line]
    assert len(rows) == 2 * 2 * 3 and all(r.endswith("ok") for r in rows)  # families x schemes x layouts
    forget_plugin("half", "half_cache")


def test_a_missing_plugin_is_a_clear_error(capsys):
    assert main(["check", "--plugin", "no/such/file.py"]) == 2
    assert "plugin file no/such/file.py does not exist" in capsys.readouterr().err
    assert main(["check", "--plugin", "no_such_module_xyz"]) == 2
    assert "plugin 'no_such_module_xyz'" in capsys.readouterr().err


def test_an_installed_plugin_reaches_kvzoo_check(tmp_path):
    """A package declaring the entry-point group kvzoo.plugins is loaded by every command."""
    site = tmp_path / "site"
    (site / "my_kvzoo_plugin").mkdir(parents=True)
    (site / "my_kvzoo_plugin" / "__init__.py").write_text(
        (EXAMPLES_DIR / "list_cache.py").read_text())
    info = site / "my_kvzoo_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-kvzoo-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[kvzoo.plugins]\nlist = my_kvzoo_plugin\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(site)])}
    command = [sys.executable, "-m", "zoo.cli", "check", "--caches", "list", "--families", "gpt2",
               "--positional", "alibi", "--layouts", "GQA"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert any(" list " in line and line.endswith("ok") for line in done.stdout.splitlines())
    skipped = subprocess.run(command, capture_output=True, text=True, timeout=300,
                             env={**env, "KVZOO_NO_PLUGINS": "1"})
    assert skipped.returncode == 2 and "unknown cache 'list'" in skipped.stderr


def test_a_broken_installed_plugin_is_named(tmp_path):
    site = tmp_path / "site"
    info = site / "broken_plugin-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[kvzoo.plugins]\nbroken = no_such_module_abc\n")
    code = textwrap.dedent("""
        from kvzoo import plugins
        try:
            plugins.load_installed()
        except plugins.PluginError as error:
            print(error)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(site)])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "installed plugin 'broken'" in done.stdout and "KVZOO_NO_PLUGINS=1" in done.stdout


@pytest.mark.parametrize("scheme", ["learned", "rope", "alibi"])
def test_a_correct_custom_cache_passes_the_property_checks(registered, scheme):
    registered("test-newest-first", NewestFirstCache)
    assert "test-newest-first" in caches.available()
    run_scenario(scenario("test-newest-first", scheme))


def test_kvzoo_check_covers_a_registered_cache(registered):
    registered("test-newest-first", NewestFirstCache)
    rows = check_pairings(cache_names=["test-newest-first"])
    assert len(rows) == 2 * 3 * 3  # families x schemes x layouts
    assert all(r.report.ok for r in rows)


@pytest.mark.parametrize("cls", [LyingOrderCache, ForgetfulCache])
def test_a_cache_that_breaks_its_contract_is_caught(registered, cls):
    registered("test-broken", cls)
    with pytest.raises(AssertionError, match="differ from the reference"):
        run_scenario(scenario("test-broken", "rope"))
    rows = check_pairings(families=["llama"], schemes=["rope"], cache_names=["test-broken"])
    assert not any(r.report.ok for r in rows)


def test_conformance_kit_in_one_call():
    import zoo

    model = zoo.build("gpt2", preset="tiny", seed=1)
    good = conformance.check(model, lambda: caches.make("concat", model), list(range(12)),
                             chunks=[3, 9], decode=5)
    bad = conformance.check(model, lambda: [ForgetfulCache() for _ in model.layers],
                            list(range(12)), chunks=[3, 9], decode=5)
    assert good.ok and good.greedy_agree == 5 and good.max_abs_diff <= 1e-4
    assert not bad.ok and bad.max_abs_diff > 1e-2


@pytest.mark.parametrize("ragged", ["", None, 0, "yes".encode()])
def test_a_ragged_declaration_must_be_true_false_or_a_reason(ragged):
    """`ragged=` is True, False or the reason a cache refuses ragged batches: an empty reason
    (which would reach the user as a blank refusal) or another type is refused at registration,
    and nothing is registered."""
    from caches.concat import ConcatCache

    before = set(caches.available())
    with pytest.raises(TypeError, match=r"ragged must be True, False or a reason \(str\)"):
        caches.register("bad-ragged", reference=None, ragged=ragged)(type("Bad", (ConcatCache,), {}))
    assert set(caches.available()) == before
