"""Text generation: streaming pieces, stop on EOS / stop strings / max_tokens, padded vocabularies.

Most tests script the model's choices with a logits processor that forces a known token
sequence, so the expected text is known independently of the model: it is the oracle's
decode of the script (sentencepiece on the same vocabulary).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import caches
import sampling
import zoo
from helpers.tokenizers import gguf_tokenizer, sentencepiece_oracle

SCRIPT = "Once upon a time, Lily saw a big cat. The cat said: 日本🙂! The end. Bye"


@pytest.fixture(scope="module")
def tok():
    return gguf_tokenizer()


@pytest.fixture(scope="module")
def model():
    # A random Llama over the stories260K vocabulary (512), with 8 padding rows past it.
    return zoo.build("llama", preset="tiny", vocab_size=520, seed=3)


def scripted(target: list[int], prompt_len: int):
    """A logits processor that makes token i of the reply `target[i]`."""

    def force(history: mx.array, logits: mx.array) -> mx.array:
        want = target[min(history.size - prompt_len, len(target) - 1)]
        return mx.where(mx.arange(logits.shape[-1]) == want, 0.0, -float("inf"))[None]

    return force


def run(model, tok, prompt="Once", script=SCRIPT, **options):
    prompt_ids = tok.encode(prompt)
    target = tok.encode(script, add_bos=False)
    options.setdefault("max_tokens", len(target))
    responses = list(zoo.stream_generate(model, tok, prompt, logits_processors=[scripted(target, len(prompt_ids))],
                                         **options))
    return responses, target


def continuation_text(ids: list[int]) -> str:
    """The oracle's text of a reply: sentencepiece decode after a spaceless piece, minus it."""
    sp = sentencepiece_oracle(remove_extra_whitespaces=False)
    return sp.decode([sp.piece_to_id("o")] + ids)[1:]


def test_streamed_text_is_the_decoded_reply_and_never_breaks_characters(model, tok):
    responses, target = run(model, tok)
    assert [r.token for r in responses] == target
    text = "".join(r.text for r in responses)
    assert text == continuation_text(target) == " " + SCRIPT
    assert all("\ufffd" not in r.text for r in responses)
    # the emoji's four byte pieces release nothing until the last one
    emoji = [i for i, r in enumerate(responses) if "🙂" in r.text]
    assert len(emoji) == 1 and all(responses[i].text == "" for i in range(emoji[0] - 3, emoji[0]))
    assert responses[-1].finish_reason == "length" and all(r.finish_reason is None for r in responses[:-1])


def test_stats_count_tokens(model, tok):
    responses, _ = run(model, tok, max_tokens=7)
    assert len(responses) == 7
    assert [r.generation_tokens for r in responses] == list(range(1, 8))
    assert all(r.prompt_tokens == len(tok.encode("Once")) for r in responses)
    assert all(r.prompt_tps > 0 and r.generation_tps > 0 and r.peak_memory > 0 for r in responses)
    assert all(r.logprobs.shape == (520,) for r in responses)


@pytest.mark.parametrize("stop, before", [
    (". The", " Once upon a time, Lily saw a big cat"),  # spans several tokens
    ("cat", " Once upon a time, Lily saw a big "),
    (["🙂", "said"], " Once upon a time, Lily saw a big cat. The cat "),  # earliest of two
    ("日本🙂!", " Once upon a time, Lily saw a big cat. The cat said: "),
    (" Once", ""),
])
def test_stop_strings_end_the_reply_before_them(model, tok, stop, before):
    responses, target = run(model, tok, stop=stop)
    assert "".join(r.text for r in responses) == before
    assert responses[-1].finish_reason == "stop"
    assert len(responses) < len(target)


@pytest.mark.parametrize("stop", ["The middle", "big dog", "🙂?", "Bye now"])
def test_text_that_may_become_a_stop_string_is_held_back_until_it_cannot(model, tok, stop):
    responses, _ = run(model, tok, stop=stop)
    full = " " + SCRIPT
    assert "".join(r.text for r in responses) == full  # none completes: everything comes out
    assert responses[-1].finish_reason == "length"
    emitted = ""
    for r in responses[:-1]:
        emitted += r.text
        assert not any(emitted.endswith(stop[:n]) for n in range(1, len(stop)))
    held = [r for r in responses if r.text == "" and r.finish_reason is None]
    assert held  # something really was held back


def test_eos_ends_generation_without_its_text(model, tok):
    target = tok.encode("The end.", add_bos=False) + [2] + tok.encode("More", add_bos=False)
    prompt = tok.encode("Once")
    responses = list(zoo.stream_generate(model, tok, prompt, max_tokens=50,
                                         logits_processors=[scripted(target, len(prompt))]))
    assert [r.token for r in responses] == target[: target.index(2) + 1]
    assert "".join(r.text for r in responses) == " The end."
    assert responses[-1].finish_reason == "stop"


def test_padding_rows_past_the_tokenizer_are_never_sampled(model, tok):
    # Push the padding ids (512..519) far above everything; they must still never come out.
    bias = {i: 1000.0 for i in range(512, 520)}
    tokens = [r.token for r in zoo.stream_generate(model, tok, "Once", max_tokens=30, temp=1.0, seed=0,
                                                   logit_bias=bias)]
    assert len(tokens) == 30 or tokens[-1] in tok.eos_ids
    assert all(t < 512 for t in tokens)
    # and without the tokenizer's size, generate_step would pick them: the test can fail
    unmasked = [t for t, _ in zoo.generate_step(model, tok.encode("Once"), max_tokens=3,
                                                logits_processors=sampling.make_logits_processors(logit_bias=bias))]
    assert all(t >= 512 for t in unmasked)


def test_greedy_reply_matches_generate_step_and_generate(model, tok):
    prompt = tok.encode("Once upon a time")
    expected = [t for t, _ in zoo.generate_step(model, prompt, max_tokens=12, vocab_size=512)]
    responses = list(zoo.stream_generate(model, tok, "Once upon a time", max_tokens=12))
    tokens = [r.token for r in responses]
    assert tokens == expected[: len(tokens)]
    text = zoo.generate(model, tok, "Once upon a time", max_tokens=12)
    reply = [t for t in tokens if t not in tok.eos_ids]
    assert text == "".join(r.text for r in responses) == continuation_text(reply)


def test_every_cache_gives_the_same_greedy_reply(model, tok):
    texts = {name: zoo.generate(model, tok, "Once upon a time", max_tokens=10, cache=name)
             for name in caches.available() if name in ("concat", "preallocated")}
    texts["prebuilt"] = zoo.generate(model, tok, "Once upon a time", max_tokens=10,
                                     cache=caches.make("preallocated", model, step=3))
    assert len(set(texts.values())) == 1


def test_seeded_sampling_is_reproducible(model, tok):
    def reply(seed):
        return [r.token for r in zoo.stream_generate(model, tok, "Once", max_tokens=15, temp=1.0,
                                                     top_p=0.9, seed=seed)]

    assert reply(1) == reply(1)
    assert reply(1) != reply(2)


def test_prompt_as_ids_and_bos_handling(model, tok):
    ids = tok.encode("Once upon")
    assert ids[0] == tok.bos_id
    by_text = [r.token for r in zoo.stream_generate(model, tok, "Once upon", max_tokens=5)]
    by_ids = [r.token for r in zoo.stream_generate(model, tok, ids, max_tokens=5)]
    by_array = [r.token for r in zoo.stream_generate(model, tok, mx.array(ids), max_tokens=5)]
    assert by_text == by_ids == by_array


def test_reply_after_only_bos_starts_a_text(model, tok):
    # With no text before it, the reply is a text of its own: no leading space.
    target = tok.encode("Hello there", add_bos=False)
    responses = list(zoo.stream_generate(model, tok, [tok.bos_id], max_tokens=len(target),
                                         logits_processors=[scripted(target, 1)]))
    assert "".join(r.text for r in responses) == sentencepiece_oracle().decode(target) == "Hello there"


@pytest.mark.parametrize(
    "options, error, message",
    [
        (dict(max_tokens=-1), ValueError, "max_tokens"),
        (dict(prefill_step=0), ValueError, "prefill_step"),
        (dict(temp=-1.0), ValueError, "temperature"),
        (dict(top_p=0.0, temp=1.0), ValueError, "top_p"),
        (dict(top_k=-2, temp=1.0), ValueError, "top_k"),
        (dict(sampler=sampling.greedy_sample, temp=0.5), ValueError, "either a sampler or sampling options"),
        (dict(stop=""), ValueError, "stop strings"),
        (dict(stop=["ok", 3]), ValueError, "stop strings"),
        (dict(repetition_penalty=0.0), ValueError, "penalty"),
        (dict(cache="ring"), ValueError, "preallocated"),
        (dict(cache="preallocated", cache_options={"size": 3}), TypeError, "step"),
        (dict(add_bos=True, prompt=[1, 5]), ValueError, "add_bos"),
        (dict(prompt="", add_bos=False), ValueError, "empty"),
        (dict(prompt=[1, 600]), ValueError, "outside the vocabulary"),
    ],
)
def test_bad_options_fail_before_anything_runs(model, tok, options, error, message):
    prompt = options.pop("prompt", "Once")
    cache = caches.make("concat", model)
    options.setdefault("cache", cache)
    with pytest.raises(error, match=message):
        zoo.stream_generate(model, tok, prompt, **options)
    assert cache[0].offset == 0


def test_generate_of_zero_tokens_is_empty(model, tok):
    assert zoo.generate(model, tok, "Once", max_tokens=0) == ""


def test_repetition_penalty_reaches_the_loop(model, tok):
    # A scripted bias makes token 300 the favourite; a huge penalty forbids repeating it.
    bias = {300: 30.0}
    plain = [r.token for r in zoo.stream_generate(model, tok, "Once", max_tokens=6, logit_bias=bias)]
    assert plain.count(300) == 6
    penalised = [r.token for r in zoo.stream_generate(model, tok, "Once", max_tokens=6, logit_bias=bias,
                                                      repetition_penalty=1e6)]
    assert penalised.count(300) == 1
    assert np.all(np.array(penalised) < 512)
