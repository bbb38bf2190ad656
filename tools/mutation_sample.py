"""Run mutmut on a fixed random sample of the mutants of caches/, positional/, sampling/ and
the model path of zoo/ (pyproject.toml's [tool.mutmut]).

A full run (thousands of mutants, each running the tests that cover its function) takes days on
a 2-core machine; a seeded sample gives a score with a known error bar in an hour or two.

    mutmut run --max-children 1 "caches.concat*"   # mutmut directly: one module (pyproject [tool.mutmut])
    python tools/mutation_sample.py --size 100 --seed 0   # a sample, then `mutmut results`
    python tools/mutation_sample.py --size 40 --seed 1 --only positional   # one package's mutants
    python tools/mutation_sample.py --size 100 --seed 0 --report   # score of that sample so far
    python tools/mutation_sample.py --size 100 --seed 0 --property-only   # which of its killed
        # mutants the property test alone kills (each rerun in ./mutants against it only)

Run from the repository root; mutmut works in ./mutants (git-ignored). docs/testing.md records
the last score and every surviving mutant.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import subprocess
import sys


def mutant_states() -> dict[str, str]:
    """name -> state ("killed", "survived", "not checked", "timeout", ...) from `mutmut results`."""
    out = subprocess.run(["mutmut", "results", "--all", "true"], capture_output=True, text=True,
                         check=True).stdout
    states = {}
    for line in out.splitlines():
        if "__mutmut_" in line and ": " in line:
            name, state = line.strip().rsplit(": ", 1)
            states[name] = state
    return states


def module(name: str) -> str:
    return ".".join(name.split(".")[:2])


def package(name: str) -> str:
    """caches, positional, sampling or zoo (the model path)."""
    return name.split(".")[0]


def report(states: dict[str, str], sample: list[str] | None = None) -> None:
    names = sample or [n for n, s in states.items() if s != "not checked"]
    done = [n for n in names if states.get(n, "not checked") != "not checked"]
    killed = [n for n in done if states[n] == "killed"]
    timeouts = sum(states[n] == "timeout" for n in done)
    print(f"{len(done)} of {len(names)} sampled mutants run; {len(killed)} killed, {timeouts} timed out "
          f"(not counted as killed)")
    if done:
        p = len(killed) / len(done)
        half = 1.96 * math.sqrt(p * (1 - p) / len(done))
        print(f"score {100 * p:.1f}% (95% interval +-{100 * half:.1f} points)")
    for group in (package, module):
        counted: dict[str, list[int]] = {}
        for n in done:
            counts = counted.setdefault(group(n), [0, 0])
            counts[0] += states[n] == "killed"
            counts[1] += 1
        for name, (k, total) in sorted(counted.items()):
            print(f"  {name:24} {k}/{total}")
    for n in done:
        if states[n] != "killed":
            print(f"  {states[n]}: {n}")


PROPERTY_TEST = ["tests/test_equivalence.py", "-k", "preserves"]  # the property test, alone


def killed_by_property_test(name: str) -> bool:
    """Rerun mutant `name` in ./mutants against only the property test: True if it fails."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # ./mutants' code wins
    env["MUTANT_UNDER_TEST"] = name
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                          *PROPERTY_TEST], cwd="mutants", env=env, capture_output=True, text=True)
    return run.returncode != 0


def property_share(states: dict[str, str], sample: list[str]) -> None:
    killed = [n for n in sample if states.get(n) == "killed"]
    alone = []
    for n in killed:
        if killed_by_property_test(n):
            alone.append(n)
        print(f"  {'killed' if n in alone else 'survived'} by the property test alone: {n}", flush=True)
    for group in sorted({package(n) for n in killed}):
        k = [n for n in killed if package(n) == group]
        print(f"  {group:24} {sum(n in alone for n in k)}/{len(k)} of its killed mutants")
    print(f"the property test alone kills {len(alone)} of the {len(killed)} killed mutants")


def main() -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", action="append", default=[], metavar="PREFIX",
                        help="sample only mutants whose name starts with PREFIX (a package, "
                             "'positional', or a module, 'caches.rotating'); repeatable")
    parser.add_argument("--report", action="store_true", help="only print the score so far")
    parser.add_argument("--property-only", action="store_true",
                        help="rerun the sample's killed mutants against the property test alone")
    args = parser.parse_args()
    states = mutant_states()
    if not states:  # mutmut has not generated the mutants yet: a run with no mutant does that
        subprocess.run(["mutmut", "run", "caches.concat.none"], check=False)
        states = mutant_states()
    names = sorted(n for n in states if not args.only or any(
        n == p or n.startswith(p + ".") for p in args.only))
    sample = sorted(random.Random(args.seed).sample(names, min(args.size, len(names))))
    if args.property_only:
        property_share(states, sample)
        return 0
    if not args.report:
        subprocess.run(["mutmut", "run", "--max-children", "1", *sample], check=False)
        states = mutant_states()
    report(states, sample)
    return 0


if __name__ == "__main__":
    sys.exit(main())
