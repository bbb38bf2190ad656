"""`kvzoo study` / `zoo.study`: cache specs, perplexity through a cache, KL against the exact
cache, the passkey generator, and the command's outputs, on stories260K and real text.

Oracles: the uncached forward over the whole text (kvzoo's, and mlx-lm's on the same weights),
the uncached forward under a window cache's reference, numpy's KL of those two, the tokenizer's
own decoding of the needle span, hashlib's digest of the text file.
"""

from __future__ import annotations

import hashlib
import json

import mlx.core as mx
import numpy as np
import pytest

import caches
import zoo
from helpers.assets import require_asset
from zoo.study.compare import compare, summarize
from zoo.study.needle import NEEDLE, make_needle
from zoo.study.perplexity import perplexity, token_nll, windows
from zoo.study.spec import CacheSpec, expand, parse, parse_list

TEXT = "corpora/tinystories-valid-part1.txt"


@pytest.fixture(scope="module")
def loaded():
    return zoo.load(require_asset("stories260K/stories260K.gguf"))


@pytest.fixture(scope="module")
def tokens(loaded):
    _, tokenizer = loaded
    text = require_asset(TEXT).read_text(encoding="utf-8")[:3000]
    return tokenizer.encode(text)[:300]


def uncached_nll(model, tokens, reference=None) -> np.ndarray:
    """The oracle: one uncached forward over the whole text."""
    logits = model(mx.array(tokens)[None], reference=reference)[0].astype(mx.float32)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return -np.array(mx.take_along_axis(logprobs[:-1], mx.array(tokens[1:])[:, None], axis=-1)[:, 0])


def uncached_logprobs(model, tokens, reference=None) -> np.ndarray:
    logits = model(mx.array(tokens)[None], reference=reference)[0].astype(mx.float32)
    return np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))[:-1].astype(np.float64)


# -- specs ---------------------------------------------------------------------------------


def test_specs_parse_values_of_the_options_kind():
    assert parse("concat") == CacheSpec("concat", {})
    spec = parse("rotating:max_size=64:keep=4")
    assert spec.options == {"max_size": 64, "keep": 4} and spec.label == "rotating:max_size=64:keep=4"
    assert [s.label for s in expand("rotating:max_size=32/64:keep=0/4")] == [
        "rotating:max_size=32:keep=0", "rotating:max_size=32:keep=4",
        "rotating:max_size=64:keep=0", "rotating:max_size=64:keep=4"]
    listed = parse_list("concat, rotating:max_size=16:keep=0,concat")
    assert [s.label for s in listed] == ["concat", "rotating:max_size=16:keep=0"]  # duplicate dropped
    assert parse("quantized:key_bits=8").options == {"key_bits": 8}  # default None: any kind


@pytest.mark.parametrize("spec, named", [
    ("nope", ["unknown cache 'nope'", "concat", "rotating"]),
    ("rotating:size=3", ["no option 'size'", "max_size, keep"]),
    ("rotating:max_size=1.5", ["max_size", "int", "1.5"]),
    ("rotating:max_size=true", ["max_size", "int", "true"]),
    ("rotating:max_size=abc", ["max_size", "'abc' is not an int"]),
    ("rotating:max_size", ["'max_size' is not option=value", "max_size, keep"]),
    ("rotating:keep=1:keep=2", ["'keep' given twice"]),
    ("rotating:max_size=4:keep=4", ["rotating:max_size=4:keep=4", "keep (4) must be smaller", "0..3"]),
    ("quantized:bits=7", ["quantized:bits=7", "bits must be one of"]),
    ("", ["NAME:option=value"]),
])
def test_a_bad_spec_is_refused_naming_the_cache_option_and_what_is_allowed(spec, named):
    with pytest.raises(ValueError) as error:
        parse(spec)
    for text in named:
        assert text in str(error.value)


def test_an_empty_spec_in_a_list_is_refused():
    with pytest.raises(ValueError, match="empty spec"):
        parse_list("concat,,rotating")


def test_a_newly_registered_cache_is_studied_with_no_edit(registered, loaded, tokens):
    """The study reads only the registry: a user's cache is parsed, built and compared."""
    from helpers.user_caches import NewestFirstCache

    registered("test-newest-first", NewestFirstCache)
    model, _ = loaded
    spec = parse("test-newest-first")
    result = compare(model, tokens[:80], caches.make("concat", model), {spec.label: spec.make(model)}, chunk=16)
    stats = summarize(result.base_nll, result.tests[spec.label])
    assert stats["kl_mean"] < 1e-6 and stats["top1_agreement"] == 1.0


# -- perplexity and KL ---------------------------------------------------------------------


def _exact_option_sets(head_dim: int, seq_len: int):
    for name in caches.available():
        for options in caches.examples(name, head_dim=head_dim, seq_len=seq_len) + [{}]:
            if caches.exact_for(name, seq_len=seq_len, **options):
                yield name, options


def test_perplexity_through_every_exact_cache_is_the_uncached_models(loaded, tokens):
    model, _ = loaded
    oracle = uncached_nll(model, tokens)
    seen = set()
    for name, options in _exact_option_sets(model.config.head_dim, len(tokens)):
        nll = token_nll(model, tokens, caches.make(name, model, **options), chunk=37)  # uneven chunks
        np.testing.assert_allclose(nll, oracle, atol=2e-4, err_msg=f"{name} {options}")
        assert perplexity(nll) == pytest.approx(perplexity(oracle), rel=1e-5)
        seen.add(name)
    assert {"concat", "preallocated", "rotating"} <= seen  # rotating while the text fits


def test_perplexity_through_an_exact_cache_is_mlx_lms_on_the_same_weights(loaded, tokens):
    from zoo.checkpoints.mlx_lm import to_mlx_lm

    model, _ = loaded
    twin = to_mlx_lm(model)
    logits = twin(mx.array(tokens)[None]).astype(mx.float32)[0]
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    theirs = -np.array(mx.take_along_axis(logprobs[:-1], mx.array(tokens[1:])[:, None], axis=-1)[:, 0])
    ours = token_nll(model, tokens, caches.make("preallocated", model), chunk=64)
    assert perplexity(ours) == pytest.approx(perplexity(theirs), rel=1e-4)


def test_perplexity_through_a_wrapped_window_is_its_references(loaded, tokens):
    model, _ = loaded
    cache = caches.make("rotating", model, max_size=24, keep=4)
    nll = token_nll(model, tokens, cache, chunk=50)  # chunks longer than the window
    np.testing.assert_allclose(nll, uncached_nll(model, tokens, cache[0].reference), atol=2e-4)


def test_perplexity_windows_cover_every_scored_token():
    nll = np.log(np.arange(1, 11, dtype=np.float64))  # 10 scored tokens
    out = windows(nll, 4)
    assert [(w["start"], w["stop"]) for w in out] == [(1, 5), (5, 9), (9, 11)]
    assert out[2]["ppl"] == pytest.approx(np.sqrt(9 * 10))
    with pytest.raises(ValueError, match="window"):
        windows(nll, 0)


def test_kl_of_an_exact_cache_against_the_exact_cache_is_zero(loaded, tokens):
    model, _ = loaded
    result = compare(model, tokens, caches.make("preallocated", model),
                     {"same": caches.make("preallocated", model), "concat": caches.make("concat", model)},
                     chunk=64)
    same = summarize(result.base_nll, result.tests["same"])
    assert same["kl_mean"] == 0.0 and same["kl_max"] == 0.0 and same["top1_agreement"] == 1.0
    assert same["delta_ppl"] == 0.0
    other = summarize(result.base_nll, result.tests["concat"])
    assert other["kl_max"] < 1e-6 and abs(other["delta_ppl"]) < 1e-4


def test_kl_of_a_cache_that_drops_tokens_is_positive_and_is_numpys(loaded, tokens):
    model, _ = loaded
    window = caches.make("rotating", model, max_size=16, keep=0)
    reference = window[0].reference
    result = compare(model, tokens, caches.make("concat", model), {"window": window}, chunk=64)
    run = result.tests["window"]
    stats = summarize(result.base_nll, run)
    assert stats["kl_mean"] > 0.01 and stats["top1_agreement"] < 1.0
    # numpy's KL(true || window) from the two uncached forwards
    p, q = uncached_logprobs(model, tokens), uncached_logprobs(model, tokens, reference)
    kl = (np.exp(p) * (p - q)).sum(-1)
    np.testing.assert_allclose(run.kl, kl, atol=2e-4)
    assert np.allclose(run.kl[:15], 0, atol=1e-5)  # nothing dropped yet: positions 0..15 fit
    assert stats["kl_p99"] == pytest.approx(np.percentile(np.maximum(kl, 0), 99), abs=1e-3)
    top1 = p.argmax(-1) == q.argmax(-1)
    assert stats["top1_agreement"] == pytest.approx(top1.mean(), abs=2 / len(top1))


# -- needle --------------------------------------------------------------------------------


def tokenizers():
    from zoo.tokenizers import load_tokenizer

    _, spm = zoo.load(require_asset("stories260K/stories260K.gguf"))
    return {"stories260K": spm, "gpt2": load_tokenizer(require_asset("gpt2-tokenizer"))}


@pytest.mark.parametrize("kind", ["stories260K", "gpt2"])
def test_the_needle_sits_where_the_generator_says(kind):
    tokenizer = tokenizers()[kind]
    starts = []
    for context in (240, 400):
        for depth in (0.0, 0.3, 0.5, 1.0):
            needle = make_needle(tokenizer, context, depth, "73914")
            assert needle.context == context
            sentence = NEEDLE.format(key="73914")
            assert tokenizer.decode(needle.tokens[needle.start:needle.stop]).strip() == sentence
            text = tokenizer.decode(needle.tokens)
            assert text.count("73914") == 2 and text.count(sentence) == 1
            # Re-tokenizing the decoded text before the needle gives (about) as many tokens as
            # the generator says are there: the position is real, not an artefact of pieces.
            before = text[: text.index(sentence)].rstrip()
            assert abs(len(tokenizer.encode(before)) - needle.start) <= 2
            filler = needle.filler_before + needle.filler_after
            assert abs(needle.filler_before - depth * filler) <= 12  # one filler sentence
            assert tokenizer.decode(needle.answer).strip() == "73914"
            starts.append(needle.start)
        assert starts[-4:] == sorted(starts[-4:])  # deeper is later


def test_a_needle_prompt_too_short_or_a_bad_depth_is_refused():
    tokenizer = tokenizers()["gpt2"]
    with pytest.raises(ValueError, match="too short"):
        make_needle(tokenizer, 20, 0.5, "12345")
    with pytest.raises(ValueError, match="depth"):
        make_needle(tokenizer, 400, 1.5, "12345")


# -- the command ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    from zoo.cli import main

    out = tmp_path_factory.mktemp("study")
    text = require_asset(TEXT)
    status = main(["study", "--model", str(require_asset("stories260K/stories260K.gguf")),
                   "--text", str(text), "--caches",
                   "concat,rotating:max_size=16:keep=0/4,quantized:bits=4,preallocated:capacity=90",
                   "--out", str(out), "--quick", "--max-tokens", "160", "--contexts", "32,96",
                   "--needle-contexts", "192", "--needle-depths", "0,1"])
    return status, out, text


def test_the_command_writes_study_json_with_the_documented_fields(cli_run):
    status, out, text = cli_run
    assert status == 0
    result = json.loads((out / "study.json").read_text())
    assert result["text"]["sha256"] == hashlib.sha256(text.read_bytes()).hexdigest()
    for key in ("schema", "settings", "caches", "text", "environment", "models", "seconds"):
        assert key in result
    env = result["environment"]
    assert env["versions"]["mlx"] and "summary" in env["blas"] and env["machine"]["cores"]
    (model,) = result["models"]
    for key in ("path", "family", "positional", "layout", "config", "params", "tokens", "baseline",
                "runs", "skipped", "needle", "notes"):
        assert key in model
    assert model["tokens"] == 160 and model["baseline"]["cache"] == "preallocated"
    runs = {r["cache"]: r for r in model["runs"]}
    assert set(runs) == {"concat", "rotating:max_size=16:keep=0", "rotating:max_size=16:keep=4",
                         "preallocated:capacity=90"}
    # a cache that fills up mid-text stops there, its error and the tokens before it kept
    full = runs.pop("preallocated:capacity=90")
    assert full["conformance"]["ok"] and "is full" in full["quality"]["error"]
    assert full["quality"]["scored_tokens"] == 64 and full["quality"]["kl_max"] < 1e-6  # chunk 64
    assert "is full" in full["cost"]["error"]
    for run in runs.values():
        assert run["conformance"]["ok"]
        for key in ("kl_mean", "kl_p99", "top1_agreement", "ppl", "ppl_base", "delta_ppl", "ppl_ratio"):
            assert isinstance(run["quality"][key], float)
        assert run["ppl_windows"] and run["kl_windows"]
        assert [p["context"] for p in run["cost"]["points"]] == [32, 96]
        assert run["cost"]["peak_bytes"] >= run["cost"]["points"][-1]["bytes"] > 0
        assert run["cost"]["prefill_tokens_per_s"] > 0
        for point in run["cost"]["points"]:
            assert point["decode_tokens_per_s_best"] >= point["decode_tokens_per_s"] > 0
    assert runs["concat"]["quality"]["kl_max"] < 1e-6
    assert runs["rotating:max_size=16:keep=0"]["quality"]["kl_mean"] > 0.01
    # the text's run: a window holds 16 tokens' keys at most, the exact cache all 159 fed
    per_token = 2 * 5 * 4 * 8 * 4  # (k, v) x layers x kv heads x head size x float32 bytes
    assert runs["rotating:max_size=16:keep=0"]["quality"]["peak_bytes"] == 16 * per_token
    assert runs["concat"]["quality"]["peak_bytes"] == 159 * per_token
    window_bytes = runs["rotating:max_size=16:keep=0"]["cost"]["points"]
    assert window_bytes[0]["bytes"] == window_bytes[1]["bytes"]  # a full window stays that size
    assert runs["rotating:max_size=16:keep=0"]["cost"]["points"][-1]["held_tokens"] == 16
    # quantized cannot serve heads of 8: skipped with the cache's reason, not a crash
    assert [s["cache"] for s in model["skipped"]] == ["quantized:bits=4"]
    assert "head size 8" in model["skipped"][0]["reason"]
    # stories260K cannot do the passkey test: said so, with its grid through the exact cache
    assert model["needle"]["able"] is False and "retrieves no passkey" in model["needle"]["reason"]
    assert {(c["context"], c["depth"]) for c in model["baseline"]["needle"]["cells"]} == {(192, 0.0), (192, 1.0)}


def test_the_command_writes_pngs(cli_run):
    _, out, _ = cli_run
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert {"ppl_vs_position.png", "kl_vs_bytes.png", "cost_vs_context.png"} <= set(pngs)
    assert any(name.startswith("needle_") for name in pngs)
    for name in pngs:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_command_refuses_a_bad_spec_before_loading_anything(tmp_path, capsys):
    from zoo.cli import main

    status = main(["study", "--model", "missing.gguf", "--text", "missing.txt",
                   "--caches", "rotating:max_size=8:keep=9", "--out", str(tmp_path / "x")])
    assert status == 2
    assert "rotating:max_size=8:keep=9" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_zoo_study_is_callable_and_its_modules_reachable(loaded, tmp_path):
    import zoo.study.spec

    text = tmp_path / "story.txt"
    text.write_text(require_asset(TEXT).read_text(encoding="utf-8")[:600], encoding="utf-8")
    settings = zoo.study.Settings.quick(needle=False, cost=False)
    result = zoo.study([str(require_asset("stories260K/stories260K.gguf"))], text, ["concat"],
                       settings=settings, progress=False)
    assert zoo.study.spec.parse("concat").name == "concat"
    assert result["models"][0]["runs"][0]["quality"]["kl_max"] < 1e-6


def test_a_plugin_file_reaches_the_command(tmp_path, capsys):
    """`--plugin` registers a user's cache before the specs are read: it is studied like any other."""
    from helpers.user_caches import forget_plugin
    from zoo.cli import main

    from pathlib import Path

    plugin = Path(__file__).resolve().parents[1] / "docs" / "examples" / "half_cache.py"
    try:
        status = main(["study", "--plugin", str(plugin), "--model", str(require_asset("stories260K/stories260K.gguf")),
                       "--text", str(require_asset(TEXT)), "--caches", "half", "--out", str(tmp_path),
                       "--quick", "--max-tokens", "96", "--no-needle", "--no-cost", "--no-plots"])
    finally:
        forget_plugin("half", "half_cache")
    assert status == 0, capsys.readouterr()
    (run,) = json.loads((tmp_path / "study.json").read_text())["models"][0]["runs"]
    assert run["cache"] == "half" and run["conformance"]["ok"]
    assert 0 < run["quality"]["kl_mean"] < 1e-3  # half-precision keys: a small, real drift


def test_spans_chunk_then_decode_one_token_at_a_time():
    from zoo.study.perplexity import spans

    assert list(spans(10, 4)) == [(0, 4), (4, 8), (8, 10)]
    assert list(spans(10, 4, prefill=6)) == [(0, 4), (4, 6)] + [(i, i + 1) for i in range(6, 10)]
    with pytest.raises(ValueError, match="prefill"):
        list(spans(10, 4, prefill=0))


def test_perplexity_in_decode_mode_through_an_exact_cache_is_the_uncached_models(loaded, tokens):
    model, _ = loaded
    nll = token_nll(model, tokens[:120], caches.make("preallocated", model), chunk=32, prefill=70)
    np.testing.assert_allclose(nll, uncached_nll(model, tokens[:120]), atol=2e-4)


class _Predictor:
    """A stand-in model that knows the sequence: at each position its logits peak (by `margin`)
    on the token that follows in `sequence`; margin 0 is the uniform distribution."""

    def __init__(self, sequence, vocab, margin):
        self.sequence, self.vocab, self.margin, self.offset = sequence, vocab, margin, 0

    def __call__(self, tokens, cache, check_tokens=True):
        L = tokens.shape[1]
        nxt = self.sequence[self.offset + 1 : self.offset + L + 1]
        self.offset += L
        logits = np.zeros((1, L, self.vocab), dtype=np.float32)
        logits[0, np.arange(L), nxt] = self.margin
        return mx.array(logits)


def test_needle_scoring_counts_a_perfect_reader_and_not_a_uniform_one():
    from zoo.study.needle import score

    tokenizer = tokenizers()["stories260K"]
    needle = make_needle(tokenizer, 240, 0.5, "73914")
    sequence = needle.tokens + needle.answer
    perfect = score(_Predictor(sequence, 512, 30.0), [], needle, chunk=50)
    assert perfect["retrieved"] and perfect["answer_logprob"] > -1e-6
    uniform = score(_Predictor(sequence, 512, 0.0), [], needle, chunk=50)
    assert not uniform["retrieved"]  # ties: argmax is token 0, never a digit here
    assert uniform["answer_logprob"] == pytest.approx(-np.log(512), abs=1e-5)


def test_an_approximate_baseline_is_named_in_the_notes(loaded, tmp_path):
    text = tmp_path / "story.txt"
    text.write_text(require_asset(TEXT).read_text(encoding="utf-8")[:600], encoding="utf-8")
    settings = zoo.study.Settings.quick(needle=False, cost=False, baseline="rotating:max_size=16:keep=0")
    result = zoo.study([str(require_asset("stories260K/stories260K.gguf"))], text, ["concat"],
                       settings=settings, progress=False)
    (note,) = result["models"][0]["notes"]
    assert "baseline rotating:max_size=16:keep=0 is not exact" in note
    assert result["models"][0]["runs"][0]["quality"]["kl_mean"] > 0  # concat against a window


@pytest.mark.parametrize("cache, options", [("concat", {}), ("rotating", {"max_size": 64, "keep": 4})])
def test_needles_scored_as_rows_of_one_batch_are_scored_as_alone(loaded, cache, options):
    from zoo.study.needle import score, score_batch

    model, tokenizer = loaded
    needles = [make_needle(tokenizer, 240, depth, key) for depth, key in ((0.0, "73914"), (0.5, "20518"), (1.0, "99999"))]
    together = score_batch(model, caches.make(cache, model, **options), needles, chunk=50)
    alone = [score(model, caches.make(cache, model, **options), n, chunk=50) for n in needles]
    for a, b in zip(together, alone):
        assert a["retrieved"] == b["retrieved"]
        assert a["answer_logprob"] == pytest.approx(b["answer_logprob"], abs=1e-4)
    assert len({round(r["answer_logprob"], 3) for r in alone}) == 3  # the rows really differ


def test_every_registered_cache_goes_through_the_study(loaded, tmp_path):
    """Each registered cache, with the first option set it declares for this model, through every
    stage: nothing in the study names a cache."""
    from zoo.study.spec import CacheSpec

    model, _ = loaded
    specs = []
    for name in caches.available():
        examples = caches.examples(name, head_dim=model.config.head_dim, seq_len=48)
        if examples:
            specs.append(CacheSpec(name, dict(examples[0])))
    assert len(specs) >= 4
    text = tmp_path / "story.txt"
    text.write_text(require_asset(TEXT).read_text(encoding="utf-8")[:600], encoding="utf-8")
    settings = zoo.study.Settings.quick(max_tokens=48, chunk=16, conformance_tokens=16, needle=False,
                                        contexts=(16, 32), decode=2)
    result = zoo.study([str(require_asset("stories260K/stories260K.gguf"))], text, specs,
                       settings=settings, progress=False)
    model_result = result["models"][0]
    runs = {r["name"]: r for r in model_result["runs"]}
    assert set(runs) | {s["cache"].split(":")[0] for s in model_result["skipped"]} == {s.name for s in specs}
    for name, run in runs.items():
        assert isinstance(run["conformance"].get("ok"), bool), (name, run["conformance"])
        assert run["quality"]["scored_tokens"] == 47 and run["quality"]["kl_mean"] >= 0, name
        assert [p["context"] for p in run["cost"]["points"]] == [16, 32], name
        if caches.exact_for(name, seq_len=48, **run["options"]):
            assert run["quality"]["kl_max"] < 1e-6, name
