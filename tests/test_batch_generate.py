"""zoo.batch_generate / zoo.batch_stream on the real stories260K model: every reply is the one
that prompt gets alone (zoo.generate, itself checked against the uncached model and
sentencepiece elsewhere), with rows ending on their own and sampling options per row.
"""

from __future__ import annotations

import pytest
from helpers.assets import require_asset

import zoo
from zoo.batch import BatchDecoder

PROMPTS = ["Once upon a time", "Tom had a red ball.", "The sun", "Lily and Ben went to the park. They saw a big dog"]


@pytest.fixture(scope="module")
def loaded():
    return zoo.load(str(require_asset("stories260K/stories260K.gguf")))


def alone(model, tokenizer, prompt, **options) -> str:
    return zoo.generate(model, tokenizer, prompt, **options)


def test_greedy_replies_with_stops_eos_and_max_tokens_per_row(loaded):
    """Row 1 ends at EOS (a logit bias makes it come after 53 tokens), row 2 at a stop string,
    rows 0 and 3 at their own max_tokens; each reply is the prompt's reply alone."""
    model, tokenizer = loaded
    max_tokens = [12, 60, 60, 25]
    bias = [None, {2: 20.0}, None, None]
    stop = ["shiny ball"]
    result = zoo.batch_generate(model, tokenizer, PROMPTS, max_tokens=max_tokens, logit_bias=bias, stop=stop)
    for r, prompt in enumerate(PROMPTS):
        assert result.texts[r] == alone(model, tokenizer, prompt, max_tokens=max_tokens[r],
                                        logit_bias=bias[r], stop=stop), f"row {r}"
    reasons = [s.finish_reason for s in result.stats]
    assert reasons[1] == "stop" and result.tokens[1][-1] == 2  # EOS, not in the text
    assert reasons[2] == "stop" and result.tokens[2][-1] != 2 and len(result.tokens[2]) < 60  # the stop string
    assert reasons[0] == "length" and result.stats[0].generation_tokens == 12
    assert reasons[3] == "length" and result.stats[3].generation_tokens == 25
    assert [s.prompt_tokens for s in result.stats] == [len(tokenizer.encode(p)) for p in PROMPTS]
    assert result.cache_bytes > 0 and result.cache_bytes_per_row == result.cache_bytes / 4
    lengths = [len(tokenizer.encode(p)) for p in PROMPTS]
    assert result.padding_slots == sum(max(lengths) - n for n in lengths)


def test_sampling_options_and_seeds_per_row(loaded):
    """Each row its own temperature, top-k/top-p/min-p, repetition penalty and seed: each row
    draws what it draws alone with those options."""
    model, tokenizer = loaded
    options = dict(temp=[0.8, 1.0, 0.0, 1.2], top_k=[0, 20, 0, 5], top_p=[1.0, 0.9, 1.0, 1.0],
                   min_p=[0.0, 0.0, 0.0, 0.05], seed=[1, 2, 3, 4], repetition_penalty=[1.3, None, 1.1, 1.5])
    result = zoo.batch_generate(model, tokenizer, PROMPTS, max_tokens=20, **options)
    for r, prompt in enumerate(PROMPTS):
        row = {k: v[r] for k, v in options.items()}
        assert result.texts[r] == alone(model, tokenizer, prompt, max_tokens=20, **row), f"row {r}: {row}"


def test_a_seeded_row_draws_the_same_whatever_the_other_rows_are(loaded):
    model, tokenizer = loaded
    first = zoo.batch_generate(model, tokenizer, PROMPTS, max_tokens=16, temp=1.0, seed=[7, 1, 2, 3])
    other = zoo.batch_generate(model, tokenizer, [PROMPTS[0], "A bird", "Max"], max_tokens=[16, 4, 30],
                               temp=1.0, seed=[7, 9, 9])
    assert first.texts[0] == other.texts[0] == alone(model, tokenizer, PROMPTS[0], max_tokens=16, temp=1.0, seed=7)
    assert other.texts[1] != other.texts[2]  # one seed per row, yet each row its own draws
    # The same seed in every row: each row is its own run with that seed.
    same = zoo.batch_generate(model, tokenizer, PROMPTS[:2], max_tokens=10, temp=1.0, seed=5)
    assert same.texts == [alone(model, tokenizer, p, max_tokens=10, temp=1.0, seed=5) for p in PROMPTS[:2]]


def test_streaming_yields_each_rows_pieces_and_nothing_after_it_ends(loaded):
    model, tokenizer = loaded
    pieces = {r: [] for r in range(len(PROMPTS))}
    ended = set()
    for row, response in zoo.batch_stream(model, tokenizer, PROMPTS, max_tokens=[3, 9, 1, 6]):
        assert row not in ended, f"row {row} yielded after it ended"
        pieces[row].append(response.text)
        if response.finish_reason is not None:
            ended.add(row)
    assert ended == set(range(len(PROMPTS)))
    for r, n in enumerate([3, 9, 1, 6]):
        assert "".join(pieces[r]) == alone(model, tokenizer, PROMPTS[r], max_tokens=n)
        assert len(pieces[r]) == n


def test_finished_rows_leave_the_caches(loaded):
    model, tokenizer = loaded
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    decoder = BatchDecoder(model, prompts)
    rows_held = []
    for row, token, _ in decoder.run([2, 6, 4, 6]):
        rows_held.append(decoder.caches[0].rows)
    assert rows_held[0] == 4 and rows_held[-1] == 2  # rows 0 and 2 were dropped on the way
    assert decoder.rows == [1, 3]


def test_batch_size_joins_prompts_as_rows_end_or_runs_groups_with_the_same_replies(loaded):
    model, tokenizer = loaded
    whole = zoo.batch_generate(model, tokenizer, PROMPTS, max_tokens=[5, 6, 7, 8])
    # preallocated: continuous batching (a prompt joins as a row ends); rotating: groups of 3
    joined = zoo.batch_generate(model, tokenizer, PROMPTS, max_tokens=[5, 6, 7, 8], batch_size=2, temp=1.0,
                                seed=[1, 2, 3, 4])
    grouped = zoo.batch_generate(model, tokenizer, PROMPTS, max_tokens=[5, 6, 7, 8], batch_size=3,
                                 cache="rotating", cache_options=dict(max_size=12, keep=2))
    assert grouped.texts == [alone(model, tokenizer, p, max_tokens=m, cache="rotating",
                                   cache_options=dict(max_size=12, keep=2)) for p, m in zip(PROMPTS, [5, 6, 7, 8])]
    assert joined.texts == [alone(model, tokenizer, p, max_tokens=m, temp=1.0, seed=s)
                            for p, m, s in zip(PROMPTS, [5, 6, 7, 8], [1, 2, 3, 4])]
    assert joined.texts[0] != whole.texts[0] or joined.texts[1] != whole.texts[1]  # it sampled
    # Continuous: prompt 2 starts once row 0 ends, while row 1 still runs (groups would wait).
    events = [row for row, _ in zoo.batch_stream(model, tokenizer, PROMPTS, max_tokens=[3, 12, 7, 8], batch_size=2)]
    assert events.index(2) < len(events) - 1 - events[::-1].index(1)
    grouped_events = [row for row, _ in zoo.batch_stream(model, tokenizer, PROMPTS, max_tokens=[3, 12, 7, 8],
                                                         batch_size=2, cache="rotating")]
    assert grouped_events.index(2) > len(grouped_events) - 1 - grouped_events[::-1].index(1)
    # A prompt with max_tokens 0 in the queue does not stall the ones after it.
    zero = zoo.batch_generate(model, tokenizer, PROMPTS, max_tokens=[2, 0, 0, 3], batch_size=1)
    assert zero.texts == [alone(model, tokenizer, p, max_tokens=m) for p, m in zip(PROMPTS, [2, 0, 0, 3])]
    assert [s.generation_tokens for s in zero.stats] == [2, 0, 0, 3]
    with pytest.raises(ValueError, match="one per prompt"):
        zoo.batch_generate(model, tokenizer, PROMPTS, max_tokens=[5, 6])
    with pytest.raises(ValueError, match="batch_size"):
        zoo.batch_generate(model, tokenizer, PROMPTS, batch_size=0)
