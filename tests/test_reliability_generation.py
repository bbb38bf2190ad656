"""The generation loop refuses what it cannot use, naming it, with the cache as it was.

Classes from the hostile-user report (issue 9): samplers and logits processors returning
something unusable, arguments checked only at the first next(), max_tokens=0 dropping the
last prompt token, layers' caches out of step, a cache continued by another model, one cache
list fed by two threads, a prompt that overflows a learned position table part-way. The cases
that used to kill the process run in a subprocess, so a regression fails the test instead of
killing pytest.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import pytest

import caches
import sampling
import zoo

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    return zoo.build("llama", preset="tiny", seed=0)


def snapshot(cache):
    return [(c.offset, [mx.array(a) for a in c.state]) for c in cache]


def assert_unchanged(cache, before):
    assert len(cache) == len(before)
    for c, (offset, arrays) in zip(cache, before):
        assert c.offset == offset
        assert len(c.state) == len(arrays)
        for a, b in zip(c.state, arrays):
            assert a.shape == b.shape and mx.array_equal(a, b)


def filled(model, tokens=(1, 2, 3, 4)):
    cache = caches.make("concat", model)
    model(mx.array([list(tokens)]), cache)
    mx.eval([c.state for c in cache])
    return cache


def run_python(code: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter with this checkout first on the path."""
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    import os

    env.update({k: v for k, v in os.environ.items() if k.startswith(("KVZOO", "OPENBLAS", "OMP"))})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=str(ROOT))


# -- samplers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("returned, error, message", [
    (lambda lp: mx.array([-1]), ValueError, "outside the vocabulary"),
    (lambda lp: mx.array([96]), ValueError, "outside the vocabulary"),
    (lambda lp: mx.array([1.0]), TypeError, "float32 values; token ids must be integers"),
    (lambda lp: mx.array([1, 2]), ValueError, r"returned shape \[2\]"),
    (lambda lp: 3, TypeError, "returned int"),
    (lambda lp: None, TypeError, "returned NoneType"),
])
def test_bad_sampler_returns_are_named(model, returned, error, message):
    cache = filled(model)
    before = snapshot(cache)
    with pytest.raises(error, match=message) as raised:
        list(zoo.generate_step(model, [5], cache=cache, sampler=returned, max_tokens=4))
    assert "sampler <lambda>" in str(raised.value) and "test_reliability_generation.py" in str(raised.value)
    # the prompt token was fed (it is in the cache), nothing the sampler returned is
    assert [c.offset for c in cache] == [before[0][0] + 1] * 2


def test_a_good_sampler_mid_generation_then_a_bad_token(model):
    """A sampler that goes wrong on its third call: two tokens are yielded, then the error,
    and the cache holds the prompt and exactly the tokens fed before it."""
    calls = []

    def flaky(logprobs):
        calls.append(1)
        return mx.array([10**7]) if len(calls) == 3 else mx.argmax(logprobs, axis=-1)

    cache = caches.make("concat", model)
    got = []
    with pytest.raises(ValueError, match="sampler .*flaky"):
        for token, _ in zoo.generate_step(model, [1, 2, 3], cache=cache, sampler=flaky, max_tokens=10):
            got.append(token)
    assert len(got) == 2
    assert cache[0].offset == 3 + 2  # prompt + the two tokens yielded (each fed to the model)
    oracle = list(zoo.generate_step(model, [1, 2, 3], max_tokens=2))
    assert got == [t for t, _ in oracle]


# -- logits processors ---------------------------------------------------------------------------


def all_minus_inf(tokens, logits):
    return mx.full(logits.shape, -float("inf"))


@pytest.mark.parametrize("processor, error, message", [
    (lambda t, logits: logits[:, :10], ValueError, r"returned shape \[1, 10\].*\[1, 96\]"),
    (lambda t, logits: None, TypeError, "returned NoneType"),
    (all_minus_inf, ValueError, "all_minus_inf .*left no token possible"),
    (lambda t, logits: logits * float("nan"), ValueError, "NaN"),
    (lambda t, logits: logits.astype(mx.int32), TypeError, "int32 values"),
])
def test_bad_processor_returns_are_named(model, processor, error, message):
    cache = filled(model)
    before = snapshot(cache)
    with pytest.raises(error, match=message):
        list(zoo.generate_step(model, [5], cache=cache, logits_processors=[processor], max_tokens=3))
    offsets = [c.offset for c in cache]
    assert offsets == [before[0][0]] * 2 or offsets == [before[0][0] + 1] * 2  # at most the prompt token


def test_processor_errors_reach_speculative_decoding(model):
    for drafter in (dict(prompt_lookup=2), dict(draft=model)):
        with pytest.raises(ValueError, match="all_minus_inf"):
            list(zoo.generate_step(model, [1, 2, 1, 2, 1], logits_processors=[all_minus_inf],
                                   max_tokens=6, **drafter))


def test_model_with_nan_weights_is_an_error_in_generation(model):
    broken = zoo.build("llama", preset="tiny", seed=0)
    broken.update({"model": {"norm": {"weight": mx.full(broken.model.norm.weight.shape, float("nan"))}}})
    with pytest.raises(ValueError, match="the model's logits are NaN"):
        list(zoo.generate_step(broken, [1, 2], max_tokens=3))


# -- arguments are checked at the call ----------------------------------------------------------


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(max_tokens=-1), ValueError, "max_tokens must be an int >= 0, got -1"),
    (dict(max_tokens=True), ValueError, "max_tokens must be an int >= 0, got True"),
    (dict(max_tokens=2.0), ValueError, "max_tokens"),
    (dict(prefill_step=True), ValueError, "prefill_step"),
    (dict(sampler="greedy"), TypeError, "sampler must be a function"),
    (dict(logits_processors=all_minus_inf), TypeError, "wrap it in a list"),
    (dict(logits_processors=[None]), TypeError, r"logits_processors\[0\]"),
])
def test_generate_step_checks_arguments_when_called(model, kwargs, error, message):
    with pytest.raises(error, match=message):
        zoo.generate_step(model, [1, 2, 3], **kwargs)  # no next(): the call itself raises


@pytest.mark.parametrize("prompt, message", [("hello", "got a str 'hello'; encode text"),
                                             (b"hi", "got a bytes"), (None, "NoneType"), (7, "int")])
def test_prompt_must_be_token_ids(model, prompt, message):
    with pytest.raises(TypeError, match=message):
        zoo.generate_step(model, prompt)


@pytest.fixture(scope="module")
def tokenizer():
    from helpers.assets import require_asset

    return zoo.load_tokenizer(require_asset("gpt2-tokenizer"))


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(stop=5), TypeError, "stop must be a str or a list of str, got int 5"),
    (dict(stop=[""]), ValueError, "non-empty"),
    (dict(add_bos="yes"), TypeError, r"add_bos must be True, False or None .*got 'yes'"),
    (dict(seed=2**64), ValueError, r"seed must be None or an int in \[0, 2\*\*64\)"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(max_tokens=True), ValueError, "max_tokens"),
])
def test_stream_generate_arguments(tokenizer, kwargs, error, message):
    gpt2 = zoo.build("gpt2", preset="tiny", vocab_size=50257, seed=0)
    with pytest.raises(error, match=message):
        zoo.stream_generate(gpt2, tokenizer, "Hello", **kwargs)


def test_seed_range_in_sampling():
    with pytest.raises(ValueError, match=r"2\*\*64"):
        sampling.make_sampler(temp=1.0, seed=2**64)
    sampling.make_sampler(temp=1.0, seed=2**64 - 1)  # the largest key is fine


def test_tokenizer_larger_than_the_model_vocabulary(model, tokenizer):
    with pytest.raises(ValueError, match="do not match: the tokenizer has 50257 ids but the model's vocabulary has 96"):
        zoo.stream_generate(model, tokenizer, "Hello")


# -- max_tokens=0 and the whole prompt ---------------------------------------------------------


def test_max_tokens_zero_prefills_the_whole_prompt(model):
    """Afterwards the cache holds exactly the prompt: continuing equals one run over it all."""
    cache = caches.make("concat", model)
    assert list(zoo.generate_step(model, [1, 2, 3, 4], cache=cache, max_tokens=0, prefill_step=3)) == []
    assert [c.offset for c in cache] == [4, 4]
    continued = [t for t, _ in zoo.generate_step(model, [5, 6], cache=cache, max_tokens=4)]
    whole = [t for t, _ in zoo.generate_step(model, [1, 2, 3, 4, 5, 6], max_tokens=4)]
    assert continued == whole
    # and the cached keys equal the uncached forward's: the last logits agree
    fresh = caches.make("concat", model)
    list(zoo.generate_step(model, [1, 2, 3, 4], cache=fresh, max_tokens=0))
    logits = model(mx.array([[5]]), fresh)[0, -1]
    oracle = model(mx.array([[1, 2, 3, 4, 5]]))[0, -1]
    assert mx.allclose(logits, oracle, atol=1e-5)


def test_prompt_past_a_learned_table_fails_before_the_first_chunk():
    gpt2 = zoo.build("gpt2", preset="tiny", seed=0)  # 256 learned positions
    cache = caches.make("concat", gpt2)
    with pytest.raises(ValueError, match="position 299 is past the learned position table of 256"):
        zoo.generate_step(gpt2, [1] * 300, cache=cache, prefill_step=100)
    assert [c.offset for c in cache] == [0, 0] and cache[0].state == ()
    warm = filled(gpt2, [1] * 200)
    before = snapshot(warm)
    with pytest.raises(ValueError, match="position 259"):
        zoo.generate_step(gpt2, [1] * 60, cache=warm, prefill_step=10)
    assert_unchanged(warm, before)


# -- layers out of step ---------------------------------------------------------------------------


def test_layers_out_of_step_are_refused(model):
    cache = filled(model)
    cache[1].trim(1)
    before = snapshot(cache)
    with pytest.raises(ValueError, match=r"out of step: layer 0 holds 4 tokens but layer 1 holds 3 \(all offsets: \[4, 3\]\)"):
        model(mx.array([[1]]), cache)
    assert_unchanged(cache, before)
    with pytest.raises(ValueError, match="out of step"):
        zoo.generate_step(model, [1], cache=cache)
    assert_unchanged(cache, before)
    cache[0].trim(1)  # back in step: works again
    model(mx.array([[1]]), cache)
    assert [c.offset for c in cache] == [4, 4]


# -- another model's cache ------------------------------------------------------------------------


def test_continuing_with_another_model_is_refused(model):
    other = zoo.build("llama", preset="tiny", seed=1)  # same shape, other weights
    cache = filled(model)
    before = snapshot(cache)
    with pytest.raises(zoo.ModelMismatchError, match="holds 4 tokens computed by another model") as raised:
        other(mx.array([[1]]), cache)
    assert "zoo.adopt_cache" in str(raised.value)
    assert_unchanged(cache, before)
    with pytest.raises(zoo.ModelMismatchError):
        list(zoo.generate_step(other, [1], cache=cache, max_tokens=2))
    assert_unchanged(cache, before)


def test_the_same_weights_in_another_object_continue(model):
    twin = zoo.build("llama", preset="tiny", seed=0)
    cache = filled(model)
    assert zoo.model_fingerprint(twin) == zoo.model_fingerprint(model)
    twin(mx.array([[1]]), cache)
    assert cache[0].offset == 5


def test_adopt_cache_is_the_explicit_way(model):
    other = zoo.build("llama", preset="tiny", seed=1)
    cache = filled(model)
    zoo.adopt_cache(cache, other)
    other(mx.array([[1]]), cache)
    assert cache[0].offset == 5


def test_an_emptied_cache_serves_any_model(model):
    other = zoo.build("llama", preset="tiny", seed=1)
    cache = filled(model)
    for c in cache:
        c.trim(c.offset)
    other(mx.array([[1, 2]]), cache)
    assert cache[0].model_fingerprint == zoo.model_fingerprint(other)


def test_changed_weights_change_the_fingerprint():
    m = zoo.build("llama", preset="tiny", seed=0)
    cache = filled(m)
    old = zoo.model_fingerprint(m)
    m.update({"model": {"norm": {"weight": m.model.norm.weight * 2}}})
    assert zoo.model_fingerprint(m) != old
    with pytest.raises(zoo.ModelMismatchError):  # the same object, but no longer the same model
        m(mx.array([[1]]), cache)


def test_fingerprint_round_trips_through_caches_save(model, tmp_path):
    cache = filled(model)
    caches.save(tmp_path / "c.safetensors", cache)
    loaded, _ = caches.load(tmp_path / "c.safetensors")
    assert all(c.model_fingerprint == zoo.model_fingerprint(model) for c in loaded)
    model(mx.array([[5]]), loaded)  # the model that filled it: continues
    other = zoo.build("llama", preset="tiny", seed=1)
    loaded, _ = caches.load(tmp_path / "c.safetensors")
    before = snapshot(loaded)
    with pytest.raises(zoo.ModelMismatchError):
        other(mx.array([[5]]), loaded)
    assert_unchanged(loaded, before)


# -- threads (and the sampler crash): one subprocess for all of them ------------------------------

# Each scenario prints tagged lines; a crash of the interpreter fails every test that reads them
# (with its stderr), and pytest itself lives on.
SCENARIOS = """
import threading
import mlx.core as mx, zoo, caches
m = zoo.build("llama", preset="tiny", seed=0)

# 1. the report's segfault: a sampler returning an id outside the vocabulary
cache = caches.make("concat", m)
def wild_sampler(logprobs):
    return mx.array([10**6])
try:
    list(zoo.generate_step(m, [1, 2], cache=cache, sampler=wild_sampler, max_tokens=3))
except ValueError as error:
    print("SAMPLER", error)
print("SAMPLER-OFFSETS", cache[0].offset, cache[1].offset)

# 1b. the same sampler crash in a ragged batch (zoo/batch.py)
try:
    list(zoo.generate_step(m, [[1, 2], [3]], sampler=lambda lp: mx.full((lp.shape[0],), 10**6, mx.int32),
                           max_tokens=3))
except ValueError as error:
    print("BATCH", error)

# 2. one cache list, three threads generating on it (three rounds: the race was intermittent)
for round in range(3):
    cache = caches.make("concat", m)
    refused, finished = [], []
    barrier = threading.Barrier(3)
    def run():
        barrier.wait()
        try:
            for _ in range(3):
                list(zoo.generate_step(m, [1, 2, 3], cache=cache, max_tokens=30))
            finished.append(1)
        except zoo.CacheInUseError as error:
            refused.append(str(error))
        mx.clear_streams()  # MLX's rule: a thread that used MLX clears its streams before it ends
    threads = [threading.Thread(target=run) for _ in range(3)]
    [t.start() for t in threads]; [t.join() for t in threads]
    print("SHARED", len(refused), len(finished), len({c.offset for c in cache}))
    if refused:
        print("SHARED-MESSAGE", refused[0])

# 3. separate caches in separate threads: each equals the single-threaded run
out = {}
def alone(i):
    cache = caches.make("concat", m)
    out[i] = [t for t, _ in zoo.generate_step(m, [1, 2, 3], cache=cache, max_tokens=20)]
    mx.clear_streams()
threads = [threading.Thread(target=alone, args=(i,)) for i in range(3)]
[t.start() for t in threads]; [t.join() for t in threads]
single = [t for t, _ in zoo.generate_step(m, [1, 2, 3], max_tokens=20)]
print("SEPARATE", all(v == single for v in out.values()), len(out))

# 4. a generator resumed in another thread
cache = caches.make("concat", m)
steps = zoo.generate_step(m, [1, 2, 3], cache=cache, max_tokens=10)
next(steps)
seen = []
def resume():
    try:
        next(steps)
    except zoo.CacheInUseError as error:
        seen.append(str(error))
    mx.clear_streams()
t = threading.Thread(target=resume); t.start(); t.join()
print("RESUMED", len(seen), "in use by thread 'MainThread'" in seen[0])
steps.close()

# 5. a cache holding another thread's unevaluated work
cache = caches.make("concat", m)
def fill():
    m(mx.array([[1, 2, 3]]), cache)  # lazy: nothing evaluated in that thread
t = threading.Thread(target=fill); t.start(); t.join()
try:
    m(mx.array([[4]]), cache)
except zoo.CacheInUseError as error:
    print("HANDOVER", "has not evaluated" in str(error), cache[0].offset)
mx.clear_streams()
print("DONE")
"""


@pytest.fixture(scope="module")
def scenarios():
    result = run_python(SCENARIOS, timeout=300)
    assert result.returncode == 0, f"the interpreter died (exit {result.returncode}): {result.stderr[-3000:]}"
    assert "DONE" in result.stdout, result.stdout + result.stderr[-2000:]
    return result.stdout.splitlines()


def lines(output, tag):
    return [line[len(tag) + 1:] for line in output if line.startswith(tag + " ")]


def test_sampler_outside_the_vocabulary_is_an_error_not_a_crash(scenarios):
    """The report's segfault: an error naming the sampler, the cache holding the prompt only."""
    (message,) = lines(scenarios, "SAMPLER")
    assert message.startswith("sampler wild_sampler") and "outside the vocabulary" in message
    assert "[0, 96)" in message
    assert lines(scenarios, "SAMPLER-OFFSETS") == ["2 2"]


def test_one_cache_in_two_threads_is_a_clear_error(scenarios):
    rounds = lines(scenarios, "SHARED")
    assert len(rounds) == 3
    for line in rounds:
        refused, finished, distinct_offsets = map(int, line.split())
        assert refused + finished == 3 and finished >= 1  # everyone refused cleanly or finished
        assert distinct_offsets == 1  # the layers of the shared cache agree
    assert any(int(line.split()[0]) > 0 for line in rounds), "no round overlapped the threads"
    message = lines(scenarios, "SHARED-MESSAGE")[0]
    assert "in use by thread" in message and "give each thread its own cache" in message


def test_separate_caches_in_separate_threads_work(scenarios):
    assert lines(scenarios, "SEPARATE") == ["True 3"]


def test_a_generator_resumed_in_another_thread_is_refused(scenarios):
    assert lines(scenarios, "RESUMED") == ["1 True"]


def test_unevaluated_work_handed_to_another_thread_is_named(scenarios):
    assert lines(scenarios, "HANDOVER") == ["True 3"]


def test_another_model_is_refused_on_the_compiled_decode_path():
    """A one-token prompt on a preallocated cache goes straight to the compiled decode step
    (zoo/runtime/compiled.py), past model.__call__: the check happens when generate_step is called."""
    m = zoo.build("llama", preset="tiny", seed=0)
    other = zoo.build("llama", preset="tiny", seed=1)
    cache = caches.make("preallocated", m)
    list(zoo.generate_step(m, [1, 2, 3], cache=cache, max_tokens=2))
    before = snapshot(cache)
    with pytest.raises(zoo.ModelMismatchError):
        zoo.generate_step(other, [4], cache=cache, max_tokens=3)
    assert_unchanged(cache, before)


def test_batched_sampler_outside_the_vocabulary_is_an_error_not_a_crash(scenarios):
    (message,) = lines(scenarios, "BATCH")
    assert message.startswith("sampler <lambda>") and "1000000, outside the vocabulary" in message
