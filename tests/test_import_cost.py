"""`import zoo` stays cheap: it loads neither mlx-lm (whose package import pulls in transformers
and torch: ~10 s on 2 cores) nor torch; greedy generation does not need them either. mlx-lm is
imported where it is used (samplers and filters built from it, the mlx-lm twins, the bench)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers.assets import ROOT

HEAVY = ("mlx_lm", "transformers", "torch")


def test_import_zoo_and_greedy_generation_load_no_heavy_packages():
    code = ("import sys, json, zoo\n"
            "after_import = sorted(m for m in %r if m in sys.modules)\n"
            "model = zoo.build('llama', preset='tiny')\n"
            "tokens = [t for t, _ in zoo.generate_step(model, [1, 2, 3], max_tokens=3)]\n"
            "print(json.dumps([after_import, sorted(m for m in %r if m in sys.modules), len(tokens)]))"
            % (HEAVY, HEAVY))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert done.returncode == 0, done.stderr
    after_import, after_generation, n = json.loads(done.stdout)
    assert after_import == [] and after_generation == [] and n == 3


def test_sampling_with_mlx_lm_filters_still_works():
    code = ("import zoo, sampling, json\n"
            "model = zoo.build('llama', preset='tiny')\n"
            "sampler = sampling.make_sampler(temp=0.8, top_k=5, top_p=0.9, min_p=0.05)\n"
            "tokens = [t for t, _ in zoo.generate_step(model, [1, 2, 3], sampler=sampler, max_tokens=4)]\n"
            "import sys; print(json.dumps([len(tokens), 'mlx_lm' in sys.modules]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [4, True]
