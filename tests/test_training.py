"""Training: overfitting one batch for every family x positional scheme, a freshly trained model
decodes through its cache as its uncached forward does, resume continues a run exactly,
vocabulary padding is never sampled, dropout is a training-mode-only difference, the schedule
is transformers', and `kvzoo train` round-trips through zoo.load, kvzoo generate and
transformers' from_pretrained."""

from __future__ import annotations

import contextlib
import io
import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import caches
import zoo
import zoo.cli
from helpers.assets import require_asset, require_module
from helpers.equivalence import TOLERANCE, cached_logits, max_abs_diff, reference_logits
from zoo.training import loop
from zoo.training.data import TokenData, random_windows
from zoo.training.optimizer import AdamW
from zoo.training.schedule import learning_rate
from zoo.training.step import make_step

FAMILIES_X_SCHEMES = [(f, p) for f in ("gpt2", "llama") for p in ("learned", "rope", "alibi")]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """The first 3,000 characters of Tiny Shakespeare."""
    text = require_asset("corpora/tinyshakespeare.txt").read_text()[:3000]
    path = tmp_path_factory.mktemp("text") / "input.txt"
    path.write_text(text)
    return path


def tiny(family, scheme, **changes):
    settings = loop.TrainSettings(data="unused", out="unused", family=family, positional=scheme, n_layers=2,
                                  n_heads=4, n_kv_heads=2, d_model=32, block_size=16, **changes)
    return loop.new_model(loop.model_config(settings, 32), seed=1)


@pytest.mark.parametrize("family,scheme", FAMILIES_X_SCHEMES)
def test_overfits_one_batch_and_then_decodes_as_its_uncached_forward(family, scheme):
    model = tiny(family, scheme)
    batch = mx.array(np.random.default_rng(0).integers(0, 32, size=(4, 17)), dtype=mx.int32)
    model.train()
    step = make_step(model, AdamW(1e-2, weight_decay=0.0), clip=1.0)
    for _ in range(150):
        loss = step([batch]).item()
    model.eval()
    assert loss < 0.05, f"{family}/{scheme}: loss {loss:.3f} on one fixed batch after 150 steps"
    # sharp attention now: the cache must still reproduce the uncached forward exactly
    tokens = np.array(batch[0, :16]).tolist()
    cache = caches.make("preallocated", model)
    assert max_abs_diff(cached_logits(model, cache, tokens, [5, 1, 1, 1, 8]),
                        reference_logits(model, tokens, cache[0].reference)) <= TOLERANCE
    greedy = [t for t, _ in zoo.generate_step(model, tokens[:4], max_tokens=12)]
    assert greedy == tokens[4:16]  # it memorised the batch


def test_windows_are_contiguous_slices_with_a_held_out_tail():
    ids = np.arange(1000)
    data = TokenData.from_ids(ids, val_fraction=0.1, block_size=16)
    assert data.train[-1] == 899 and data.val[0] == 900
    w = np.array(random_windows(data.train, 8, 16, seed=0, step=3))
    assert w.shape == (8, 17) and (np.diff(w, axis=1) == 1).all() and w.max() <= 899
    assert (w == np.array(random_windows(data.train, 8, 16, seed=0, step=3))).all()
    assert not (w == np.array(random_windows(data.train, 8, 16, seed=0, step=4))).all()
    with pytest.raises(ValueError, match="block_size"):
        TokenData.from_ids(ids[:20], val_fraction=0.1, block_size=16)


def test_schedule_is_transformers_cosine_with_min_lr():
    torch = require_module("torch")
    transformers = require_module("transformers")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-3)
    sched = transformers.get_cosine_with_min_lr_schedule_with_warmup(opt, 10, 100, min_lr=3e-4)
    theirs = []
    for _ in range(100):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    ours = [learning_rate(i, lr=3e-3, warmup=10, total=100, min_lr=3e-4) for i in range(100)]
    assert np.allclose(ours, theirs, rtol=1e-9, atol=1e-12)


def test_dropout_only_in_training_mode():
    model = zoo.build("gpt2", preset="tiny", dropout=0.3, seed=0)
    plain = zoo.build("gpt2", preset="tiny", dropout=0.0, seed=0)
    x = mx.array([[1, 2, 3, 4, 5]])
    assert not model.training  # built for inference
    assert max_abs_diff(model(x), plain(x)) == 0.0
    model.train()
    assert max_abs_diff(model(x), plain(x)) > 1e-3
    plain.train()
    # rate 0: identity; the training forward's vectorisable softmax (zoo/fastmath.py) rounds
    # differently from MLX's fused attention, so equal to float32 rounding, not bit for bit
    assert max_abs_diff(plain(x), zoo.build("gpt2", preset="tiny", seed=0)(x)) <= 1e-5
    with pytest.raises(ValueError, match="dropout"):
        zoo.build("gpt2", preset="tiny", dropout=1.0)


def run_cli(*args) -> list[str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert zoo.cli.main([str(a) for a in args]) == 0
    return out.getvalue().splitlines()


SMALL = ("--n-layers", 1, "--n-heads", 2, "--d-model", 32, "--block-size", 32, "--batch-size", 4,
         "--lr", 3e-3, "--eval-interval", 5, "--eval-batches", 1, "--no-progress")


def test_cli_round_trip_through_zoo_load_generate_and_transformers(text_file, tmp_path):
    out = tmp_path / "run"
    lines = run_cli("train", "--data", text_file, "--tokenizer", "char", "--family", "gpt2", "--positional",
                    "learned", "--n-kv-heads", 2, "--steps", 10, "--dropout", 0.1, "--seed", 0,
                    "--activation", "gelu", "--out", out, *SMALL)
    state = json.loads((out / "trainer_state.json").read_text())
    assert lines[-1] == f"final loss {state['history'][-1]['train_loss']:.4f}"
    assert state["step"] == 10 and len(state["history"]) == 3  # steps 1, 5, 10
    model, tokenizer = zoo.load(out)
    assert tokenizer.decode(tokenizer.encode("First Citizen")) == "First Citizen"
    prompt = tokenizer.encode("First")
    ours = [t for t, _ in zoo.generate_step(model, prompt, max_tokens=8)]
    reply = run_cli("generate", "--model", out, "--prompt", "First", "--max-tokens", 8)
    assert "".join(reply) == tokenizer.decode(ours)
    torch = require_module("torch")
    transformers = require_module("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = np.array([prompt + ours])
    theirs = hf(torch.tensor(ids, dtype=torch.long)).logits.detach().numpy()
    assert np.abs(theirs - np.array(model(mx.array(ids)))).max() < 1e-4


@pytest.mark.parametrize("family,scheme", [("gpt2", "alibi"), ("llama", "rope")])
def test_resume_continues_the_run_exactly(text_file, tmp_path, family, scheme):
    common = dict(tokenizer="byte", family=family, positional=scheme, n_layers=1, n_heads=2, d_model=32,
                  block_size=32, batch_size=4, lr=3e-3, warmup=2, eval_interval=3, eval_batches=1,
                  grad_accum=2, steps=6, progress=False)
    whole = zoo.train(str(text_file), str(tmp_path / "whole"), **common)
    paused = zoo.train(str(text_file), str(tmp_path / "parts"), stop_after=3, **common)
    assert paused.history[-1]["step"] == 3
    resumed = zoo.train(str(text_file), str(tmp_path / "parts"), resume=True)
    assert [h["step"] for h in resumed.history] == [1, 3, 6]
    assert resumed.final_loss == whole.final_loss
    a, b = dict(tree_flatten(whole.model.parameters())), dict(tree_flatten(resumed.model.parameters()))
    assert max(np.abs(np.array(a[k]) - np.array(b[k])).max() for k in a) <= 1e-6
    with pytest.raises(FileNotFoundError, match="trainer_state"):
        zoo.train(str(text_file), str(tmp_path / "nothing"), resume=True)


def test_padded_vocabulary_is_never_sampled(text_file, tmp_path):
    result = zoo.train(str(text_file), str(tmp_path / "pad"), tokenizer="char", n_layers=1, n_heads=2,
                       d_model=32, block_size=32, batch_size=4, steps=2, eval_interval=2, eval_batches=1,
                       pad_vocab=64, progress=False)
    model, tokenizer = zoo.load(tmp_path / "pad")
    vocab, padded = tokenizer.vocab_size, model.config.vocab_size
    assert padded % 64 == 0 and vocab < padded
    # a sampler that picks the highest id it is allowed to: a padded one whenever it can
    def highest_allowed(logprobs):
        ids = mx.arange(logprobs.shape[-1])
        return mx.argmax(mx.where(mx.isfinite(logprobs), ids, -1), axis=-1)

    prompt = tokenizer.encode("First")
    unmasked = [t for t, _ in zoo.generate_step(model, prompt, max_tokens=5, sampler=highest_allowed)]
    assert unmasked == [padded - 1] * 5  # the sampler does pick padding when let
    masked = [t for t, _ in zoo.generate_step(model, prompt, max_tokens=5, vocab_size=vocab,
                                              sampler=highest_allowed)]
    assert masked == [vocab - 1] * 5
    # zoo.generate bounds sampling by the tokenizer's vocabulary by itself
    text = zoo.generate(model, tokenizer, "First", max_tokens=5, sampler=highest_allowed)
    assert text == tokenizer.decode([vocab - 1] * 5) and result.model.config.vocab_size == padded


def test_bad_training_input_is_refused_by_name(text_file, tmp_path, capsys):
    assert zoo.cli.main(["train", "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "missing.txt does not exist" in capsys.readouterr().err
    with pytest.raises(ValueError, match="tokenizer must be 'char', 'byte'"):
        zoo.train(str(text_file), str(tmp_path / "o"), tokenizer="nonsense")
    with pytest.raises(ValueError, match="block_size"):
        zoo.train(str(text_file), str(tmp_path / "o"), block_size=4096)
    with pytest.raises(TypeError, match="unknown training setting"):
        zoo.train(str(text_file), str(tmp_path / "o"), n_layer=2)
    with pytest.raises(ValueError, match="n_heads"):
        zoo.train(str(text_file), str(tmp_path / "o"), n_heads=4, n_kv_heads=3, steps=1)
    assert not (tmp_path / "o").exists()  # nothing written
