"""Plant realistic bugs one at a time and count the tests that catch each (issue: test strength).

Each bug below is a small source edit of the kind that has shipped in real KV-cache code (see
docs/testing.md). For every bug the script copies the working tree to a temporary folder, applies
the edit, runs the test suite there and records which tests fail. A bug is *killed* when at least
`--need` distinct test functions fail (parametrized cases of one function count once): no single
test may be the only guard of a contract.

    python tools/planted_bugs.py                 # every bug, stop each run at --need functions
    python tools/planted_bugs.py --only sinks    # bugs whose name contains "sinks"
    python tools/planted_bugs.py --all-failures  # run the whole suite per bug (slow), count all

Exit status 1 when a bug is not killed. Not part of CI (one suite run per bug); the last table is
in docs/testing.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Bug:
    name: str
    what: str
    file: str
    edits: tuple[tuple[str, str], ...]  # (old, new), each `old` must occur exactly once


BUGS = [
    Bug("decode-position-off-by-one", "decoded tokens get position offset-1",
        "zoo/model.py",
        (("positions = mx.arange(offset, offset + length, dtype=mx.int32)",
          "start = offset - 1 if length == 1 and offset > 0 else offset\n"
          "        positions = mx.arange(start, start + length, dtype=mx.int32)"),)),
    Bug("learned-restart-per-chunk", "learned positions restart at 0 in every chunk",
        "positional/learned.py",
        (("return h + self.weight[positions]", "return h + self.weight[positions - positions[0]]"),)),
    Bug("causal-dropped-warm-chunk", "no causal mask for a multi-token chunk after a prefill",
        "caches/attention.py",
        (('queries, keys, values, scale=scale, mask="causal"',
          'queries, keys, values, scale=scale,\n'
          '                    mask="causal" if keys.shape[-2] == queries.shape[-2] else None'),)),
    Bug("rope-keys-at-zero", "new keys rotated at offset 0 instead of their positions",
        "positional/rope.py",
        (("return self._apply(queries, offset), self._apply(keys, offset)",
          "return self._apply(queries, offset), self._apply(keys, offset * 0)"),)),
    Bug("alibi-slopes-interleaved", "ALiBi slopes assigned to heads in interleaved order",
        "positional/alibi.py",
        (("mx.array(alibi_slopes(n_heads), dtype=mx.float32)",
          "mx.array(alibi_slopes(n_heads)[0::2] + alibi_slopes(n_heads)[1::2], dtype=mx.float32)"),)),
    Bug("ring-overwrites-sinks", "the rotating ring wraps onto the sink slots",
        "caches/rotating.py",
        (("return self.keep + (position - self.keep) % self.window",
          "return position % self.max_size if position >= self.max_size else position"),)),
    Bug("ring-positions-off-by-one", "key positions off by one after the ring wraps",
        "caches/rotating.py",
        (("ring = last - (last - self.keep - r) % self.window",
          "ring = last - (last - self.keep - r) % self.window + 1"),)),
    Bug("value-bits-from-keys", "the quantized cache stores values at the key width",
        "caches/quantized.py",
        (("self.key_bits, self.value_bits = key_bits, value_bits",
          "self.key_bits, self.value_bits = key_bits, key_bits"),)),
    Bug("gqa-heads-tiled", "grouped query heads matched to kv heads in tiled (h % Hkv) order",
        "caches/attention.py",
        (("queries = queries.reshape(B, Hkv, n_rep, queries.shape[-1])",
          "queries = queries.reshape(B, n_rep, Hkv, queries.shape[-1]).swapaxes(1, 2)"),)),
    Bug("gpt2-scale-d-model", "GPT-2 attention scaled by 1/sqrt(d_model)",
        "zoo/families/gpt2.py",
        (("self.scale = cfg.head_dim**-0.5", "self.scale = cfg.d_model**-0.5"),)),
    Bug("growth-one-short", "a preallocated buffer growth copies one token short",
        "caches/preallocated.py",
        (("self.keys = mx.concatenate([self.keys[..., : self.offset, :], new_k], axis=2)",
          "self.keys = mx.concatenate([self.keys[..., : max(self.offset - 1, 0), :], new_k[..., :1, :], new_k], axis=2)"),)),
    Bug("detokenizer-drops-tail", "the streaming detokenizer drops bytes held at the end",
        "zoo/tokenizers/base.py",
        (('piece = self._decoder.decode(b"", final=True)', 'piece = ""'),)),
    Bug("history-after-prefill", "repetition history starts after the prompt",
        "zoo/generate.py",
        (("    history = prompt\n", "    history = prompt[:0]\n"),)),
    Bug("spm-ties-rightmost", "equal-score SentencePiece merges break ties at the rightmost pair",
        "zoo/tokenizers/gguf.py",
        (("heapq.heappush(queue, (-self.scores[i], left, right, len(merged)))",
          "heapq.heappush(queue, (-self.scores[i], -left, left, right, len(merged)))"),
         ("_, left, right, merged_size = heapq.heappop(queue)",
          "_, _, left, right, merged_size = heapq.heappop(queue)"))),
    Bug("ring-says-in-order", "a wrapped rotating cache reports its keys as in time order",
        "caches/rotating.py",
        (("return self._ring_positions(self.offset) if self.wrapped else None",
          "return None"),
         ("return Fetched(stored_k, stored_v, lambda: self._ring_positions(prev + 1), causal=True)",
          "return stored_k, stored_v"))),
    Bug("trim-keeps-keys", "concat trim moves the offset but keeps the stored keys",
        "caches/concat.py",
        (("self.keys = self.keys[..., : self.offset - n, :]\n        self.values = self.values[..., : self.offset - n, :]",
          "pass"),)),
    Bug("filter-order", "top-k applied before top-p (the order mlx-lm and HF agree on is top-p first)",
        "sampling/samplers.py",
        (("(top_p_filter(top_p), min_p_filter(min_p, min_tokens_to_keep), top_k_filter(top_k))",
          "(top_k_filter(top_k), min_p_filter(min_p, min_tokens_to_keep), top_p_filter(top_p))"),)),
]

# A pytest plugin written next to the copy: stops the run once `need` distinct functions failed,
# and turns off hypothesis shrinking (a failing example is enough here; shrinking costs minutes).
PLUGIN = '''
import os
from hypothesis import Phase, settings

NEED = int(os.environ["PLANTED_NEED"])
failed = set()


def pytest_collection_finish(session):
    settings.register_profile("planted", parent=settings.get_profile("kvzoo"),
                              phases=[Phase.explicit, Phase.reuse, Phase.generate])
    settings.load_profile("planted")


def pytest_runtest_logreport(report):
    if report.failed:
        failed.add(report.nodeid.split("[")[0])
        with open(os.environ["PLANTED_LOG"], "a") as log:
            log.write(report.nodeid + "\\n")


def pytest_runtest_teardown(item, nextitem):
    if NEED and len(failed) >= NEED:
        item.session.shouldstop = f"{len(failed)} test functions failed"
'''


def export(commit: str, dest: Path) -> None:
    """The files of `commit` into `dest` (a commit, not the working tree: it may be mid-edit)."""
    archive = subprocess.run(["git", "archive", commit], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)


def plant(bug: Bug, source: Path, dest: Path) -> None:
    """Copy the exported tree to `dest` and apply the bug's edits (each must match exactly once)."""
    shutil.copytree(source, dest, dirs_exist_ok=True)
    path = dest / bug.file
    text = path.read_text()
    for old, new in bug.edits:
        if text.count(old) != 1:
            raise SystemExit(f"{bug.name}: edit target found {text.count(old)} times in {bug.file}; "
                             f"update the bug to the current source:\n{old}")
        text = text.replace(old, new)
    path.write_text(text)
    (dest / "planted_stop.py").write_text(PLUGIN)


def run(bug: Bug, source: Path, need: int, timeout: int) -> tuple[list[str], float, str]:
    """(failing test ids, seconds, problem): problem is "" or why the run says nothing."""
    with tempfile.TemporaryDirectory(prefix=f"planted-{bug.name}-") as tmp:
        dest = Path(tmp)
        plant(bug, source, dest)
        log = dest / "failures.txt"
        log.touch()
        env = dict(os.environ, PYTHONPATH=str(dest), PLANTED_NEED=str(need), PLANTED_LOG=str(log),
                   KVZOO_DATA=os.environ.get("KVZOO_DATA", str(ROOT.parent / "shared" / "data")))
        start = time.perf_counter()
        problem = ""
        try:
            done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "planted_stop", "-p",
                            "no:cacheprovider",
                            # reruns of other tests under the other BLAS / from a built wheel:
                            # not independent guards, so they do not count
                            "--ignore=tests/test_blas.py", "--ignore=tests/test_install.py"],
                           cwd=dest, env=env, capture_output=True, text=True, timeout=timeout)
            last = (done.stdout.strip().splitlines() or [""])[-1]
            if done.returncode not in (0, 1):  # 2 is also how a run stopped at `need` ends
                problem = f"pytest exit {done.returncode}: {last}"
        except subprocess.TimeoutExpired:
            problem = f"timed out after {timeout} s"
        return log.read_text().splitlines(), time.perf_counter() - start, problem


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run the bugs whose name contains this")
    parser.add_argument("--need", type=int, default=3, help="distinct failing test functions to call a bug killed")
    parser.add_argument("--all-failures", action="store_true", help="run the whole suite per bug")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per bug")
    parser.add_argument("--commit", default="HEAD", help="the commit whose tree gets the bugs")
    args = parser.parse_args()
    bugs = [b for b in BUGS if not args.only or args.only in b.name]
    weak = []
    source = Path(tempfile.mkdtemp(prefix="planted-source-"))
    export(args.commit, source)
    print(f"{'bug':28} {'functions':>9} {'cases':>6} {'s':>6}  first failing tests")
    for bug in bugs:
        failures, seconds, problem = run(bug, source, 0 if args.all_failures else args.need, args.timeout)
        functions = sorted({f.split("[")[0] for f in failures})
        if len(functions) < args.need:
            weak.append(bug.name)
        shown = ", ".join(f.split("::")[-1] for f in functions[:4])
        print(f"{bug.name:28} {len(functions):>9} {len(failures):>6} {seconds:>6.0f}  {shown}"
              + (f"  ({problem})" if problem and len(functions) < args.need else ""), flush=True)
    shutil.rmtree(source)
    if weak:
        print(f"killed by fewer than {args.need} test functions: {', '.join(weak)}")
        return 1
    print(f"every bug killed by >= {args.need} test functions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
