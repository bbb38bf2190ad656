"""The literature caches against transcriptions of their papers' reference code (PyTorch).

- streaming: mit-han-lab/streaming-llm, StartRecentKVCache (evict to start + recent after each
  token) with pos_shift attention (keys re-rotated at 0..len-1, HF's rotate_half RoPE, query at
  its place in the cache), one token at a time: our cache with window = recent + 1 (the query
  itself is in our window) gives the same attention outputs.
- h2o: FMInference/H2O, H2OKVCache_LayerWise (_update_hh_score accumulating softmax weights,
  __call__ keeping topk(hh_score[:-recent]) + the recent tokens, per head), run on the
  attention of the keys it kept: our cache keeps the same positions per head and attends the same.
- snapkv: FasterDecoding/SnapKV, SnapKVCluster.update_kv (window queries' softmax, causal inside
  the window, summed, avg_pool1d, topk): our compression keeps the same keys.

- kvpress (NVIDIA/kvpress): SnapKVPress on grouped heads (weights averaged over each group's
  query heads), per row and kv head; its group average is also how h2o groups heads.

Each kv head chooses its own keys (per head, as the references do). Also the memory the
eviction caches really hold, and kivi's bytes against an fp16 cache.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

import caches
import zoo
from caches.h2o import H2OCache
from caches.snapkv import SnapKVCache, pooled_votes
from caches.streaming import StreamingCache
from helpers.assets import require_module
from positional.rope import RoPE

torch = require_module("torch")
F = torch.nn.functional


def hf_rope(x, positions, base=10000.0):
    """HF Llama's RoPE (rotate_half pairing), in torch: x [..., L, D] at positions [L]."""
    D = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    angles = torch.tensor(positions, dtype=torch.float64)[:, None] * inv_freq[None, :]
    emb = torch.cat([angles, angles], dim=-1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def draws(seed, n, H=1, D=16):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((1, H, n, D)).astype(np.float32) for _ in range(3)]


# -- StreamingLLM ---------------------------------------------------------------------------


@pytest.mark.parametrize("start,recent", [(4, 6), (2, 3), (0, 5), (1, 1)])
def test_streaming_attends_as_start_recent_with_pos_shift(start, recent):
    n, D = 24, 16
    q, k, v = draws(start * 10 + recent, n, D=D)
    # Theirs: decode one token at a time, evict to start + recent after each step.
    past_k = past_v = None
    theirs = []
    for t in range(n):
        kt, vt, qt = (torch.tensor(a[:, :, t : t + 1]) for a in (k, v, q))
        past_k = kt if past_k is None else torch.cat([past_k, kt], dim=2)
        past_v = vt if past_v is None else torch.cat([past_v, vt], dim=2)
        length = past_k.shape[2]
        keys = hf_rope(past_k, list(range(length)))  # key pos is the pos in cache
        query = hf_rope(qt, [length - 1])
        weights = torch.softmax(query @ keys.transpose(2, 3) / math.sqrt(D), dim=-1)
        theirs.append((weights @ past_v).numpy())
        if length > start + recent:  # StartRecentKVCache.__call__
            past_k = torch.cat([past_k[:, :, :start], past_k[:, :, length - recent :]], dim=2)
            past_v = torch.cat([past_v[:, :, :start], past_v[:, :, length - recent :]], dim=2)
    # Ours: window = recent + 1 (our window counts the query itself).
    rope = RoPE(D)
    rotate = lambda x, p: rope.rotate(x, x, p)[0]  # noqa: E731
    cache = StreamingCache(sinks=start, window=recent + 1)
    ours = []
    for t in range(n):
        pos = mx.array([t], dtype=mx.int32)
        out = cache.attend(mx.array(q[:, :, t : t + 1]), mx.array(k[:, :, t : t + 1]), mx.array(v[:, :, t : t + 1]),
                           scale=1 / math.sqrt(D), q_positions=pos, rotate=rotate)
        ours.append(np.array(out))
    np.testing.assert_allclose(np.concatenate(ours, 2), np.concatenate(theirs, 2), atol=2e-5, rtol=0)
    assert cache.size() == min(n, start + recent + 1)


def test_streaming_refuses_learned_positions_and_mlx_lm_with_the_reason():
    with pytest.raises(caches.Unsupported, match="absolute positions to the token embeddings"):
        caches.make("streaming", zoo.build("gpt2", preset="tiny", positional="learned"))
    cache = caches.make("streaming", zoo.build("llama", preset="tiny"))[0]
    with pytest.raises(NotImplementedError, match="rotate keys by their absolute positions"):
        cache.make_mask(1)


# -- H2O ------------------------------------------------------------------------------------


class H2OKVCache_LayerWise:
    """Transcribed from FMInference/H2O h2o_hf/utils_real_drop/modify_llama.py."""

    def __init__(self, hh_size=4, recent_size=512, k_seq_dim=2, v_seq_dim=2):
        self.hh_size = hh_size
        self.recent_size = recent_size
        self.cache_size = hh_size + recent_size
        self.k_seq_dim = k_seq_dim
        self.hh_score = None

    def __call__(self, past_key_values, attn_score_cache):
        self._update_hh_score(attn_score_cache)
        seq_len = past_key_values[0].size(self.k_seq_dim)
        if seq_len <= self.cache_size:
            return past_key_values
        bsz, num_heads, _, head_dim = past_key_values[0].shape
        select_hh_scores = self.hh_score[:, :seq_len - self.recent_size]
        _, keep_topk = torch.topk(select_hh_scores, self.hh_size, dim=-1)
        keep_topk = keep_topk.sort().values
        keep_recent = torch.arange(seq_len - self.recent_size, seq_len).repeat(keep_topk.shape[0], 1)
        keep_idx = torch.cat([keep_topk, keep_recent], dim=-1)
        mask = torch.zeros(self.hh_score.shape, dtype=torch.bool)
        mask = mask.scatter(-1, keep_idx, 1)
        # theirs: .squeeze(), the same for bsz 1 and several heads; [0] keeps one head a head
        k_hh_recent = past_key_values[0][0][mask].view(bsz, num_heads, -1, head_dim)
        v_hh_recent = past_key_values[1][0][mask].view(bsz, num_heads, -1, head_dim)
        self.hh_score = self.hh_score[mask].view(num_heads, self.cache_size)
        return (k_hh_recent, v_hh_recent)

    def _update_hh_score(self, attn_score_cache):
        num_new_tokens = attn_score_cache.shape[2]
        if self.hh_score is None:
            self.hh_score = attn_score_cache.sum(0).sum(1)
        else:
            attn_score_cache = attn_score_cache.sum(0).sum(1)
            attn_score_cache[:, :-num_new_tokens] += self.hh_score
            self.hh_score = attn_score_cache


def held(cache):
    """The positions a cache holds, per row and kv head ([S] before anything was evicted)."""
    B, H, S = cache.keys.shape[:3]
    return np.broadcast_to(np.array(cache.key_positions()), (B, H, S)).tolist()


def kept_indices(before, after):
    """For each head, the indices into `before` [1, H, S, D] of the keys in `after` [1, H, n, D]
    (theirs return keys, not indices: matched back by value; the draws are distinct)."""
    return [[next(i for i in range(before.shape[2]) if torch.equal(before[0, h, i], row)) for row in after[0, h]]
            for h in range(before.shape[1])]


def group_mean(weights, n_kv):
    """kvpress's rule for grouped heads: the weights of the query heads reading one kv head,
    averaged (NVIDIA/kvpress, kvpress/presses/observed_attention_press.py and
    snapkv_press.py, `.view(bsz, num_key_value_heads, -1, n).mean(2)`)."""
    B, Hq, L, S = weights.shape
    return weights.view(B, n_kv, Hq // n_kv, L, S).mean(2)


@pytest.mark.parametrize("heads", [(1, 1), (3, 3), (4, 2), (2, 1)], ids=["1head", "MHA", "GQA", "MQA"])
@pytest.mark.parametrize("budget,recent,prompt", [(8, 2, 10), (6, 3, 6), (5, 1, 12)])
def test_h2o_keeps_per_head_and_attends_what_h2o_reference_code_does(budget, recent, prompt, heads):
    """Per kv head, the positions H2O's H2OKVCache_LayerWise (FMInference/H2O,
    h2o_hf/utils_real_drop/modify_llama.py: hh_score [num_heads, S], topk per head) keeps at
    every step, fed the attention weights of the keys it kept; for grouped heads, the weights
    averaged over each group's query heads as kvpress does (H2O's code is MHA only). The
    attention outputs agree too."""
    Hq, Hkv = heads
    n, D = 30, 16
    rng = np.random.default_rng(budget + recent + 10 * Hq + Hkv)
    q = rng.standard_normal((1, Hq, n, D)).astype(np.float32)
    k, v = (rng.standard_normal((1, Hkv, n, D)).astype(np.float32) for _ in range(2))
    theirs_cache = H2OKVCache_LayerWise(hh_size=budget - recent, recent_size=recent)
    past, theirs, kept_theirs = None, [], []
    positions = [[] for _ in range(Hkv)]  # per kv head, the absolute position of each kept key
    steps = [(0, prompt)] + [(t, t + 1) for t in range(prompt, n)]
    for a, b in steps:  # the prompt at once, then one token at a time
        kt, vt, qt = (torch.tensor(x[:, :, a:b]) for x in (k, v, q))
        past = (kt, vt) if past is None else (torch.cat([past[0], kt], 2), torch.cat([past[1], vt], 2))
        positions = [p + list(range(a, b)) for p in positions]
        keys = past[0].repeat_interleave(Hq // Hkv, dim=1)  # HF's repeat_kv
        scores = qt @ keys.transpose(2, 3) / math.sqrt(D)
        causal = torch.tensor(positions).repeat_interleave(Hq // Hkv, dim=0)[:, None, :] > torch.arange(a, b)[None, :, None]
        weights = torch.softmax(scores.masked_fill(causal[None], -float("inf")), dim=-1)
        theirs.append((weights @ past[1].repeat_interleave(Hq // Hkv, dim=1)).numpy())
        kept = theirs_cache(past, group_mean(weights, Hkv))
        if kept is not past:
            positions = [[p[i] for i in idx] for p, idx in zip(positions, kept_indices(past[0], kept[0]))]
            past = kept
        kept_theirs.append(positions)
    cache = H2OCache(budget=budget, recent=recent)
    ours = []
    for (a, b), want in zip(steps, kept_theirs):
        out = cache.attend(mx.array(q[:, :, a:b]), mx.array(k[:, :, a:b]), mx.array(v[:, :, a:b]),
                           scale=1 / math.sqrt(D), q_positions=mx.arange(a, b, dtype=mx.int32))
        ours.append(np.array(out))
        assert held(cache) == [want], (a, b)
    np.testing.assert_allclose(np.concatenate(ours, 2), np.concatenate(theirs, 2), atol=2e-5, rtol=0)
    assert cache.keys.shape == (1, Hkv, budget, D)  # each head holds its own budget of keys


class KeysOfHeadZero(H2OCache):
    """Planted bug: records each kv head's own choice, but keeps head 0's keys in every head."""

    def _evict(self, keep):
        super()._evict(keep)
        first = mx.broadcast_to(keep[:, :1], keep.shape)
        self.keys = mx.take_along_axis(self._before[0], first[..., None], axis=2)
        self.values = mx.take_along_axis(self._before[1], first[..., None], axis=2)

    def attend(self, queries, keys, values, **kwargs):
        held = (keys, values) if self.keys is None else (mx.concatenate([self.keys, keys], 2),
                                                          mx.concatenate([self.values, values], 2))
        self._before = held
        return super().attend(queries, keys, values, **kwargs)


def test_the_oracle_catches_keys_kept_from_the_wrong_head():
    """The per-head record is what the masked oracle reads: a cache that keeps other keys in a
    head than its record says fails the conformance check; the honest cache passes."""
    from caches import conformance

    model = zoo.build("llama", preset="tiny", n_kv_heads=2, seed=0, positional="alibi")
    prompt = [(5 * i + 2) % model.config.vocab_size for i in range(24)]

    def make(cls):
        def fresh():
            layers = [cls(budget=8, recent=2) for _ in model.layers]
            for layer in layers:
                layer.join(layers)
            return layers
        return fresh

    layers = make(H2OCache)()
    for a, b in [(0, 9), (9, 10), (10, 24)]:
        model(mx.array([prompt[a:b]]), layers)
    held = layers[0].key_positions()
    assert not mx.array_equal(held[0, 0], held[0, 1])  # the two kv heads kept different keys
    honest = conformance.check(model, make(H2OCache), prompt, chunks=[9, 1, 14], decode=4)
    planted = conformance.check(model, make(KeysOfHeadZero), prompt, chunks=[9, 1, 14], decode=4)
    assert honest.ok and not planted.ok and planted.max_abs_diff > 1e-3, (honest, planted)


def test_h2o_per_layer_option_keeps_one_set_for_every_head():
    """per_head=False: the mass summed over every head (H2O's rule on the layer's total), so
    every kv head keeps the same positions, those the per-head rule picks with one head whose
    weights are the sum."""
    rng = np.random.default_rng(5)
    n, D, budget, recent = 20, 8, 6, 2
    q = rng.standard_normal((1, 4, n, D)).astype(np.float32)
    k, v = (rng.standard_normal((1, 2, n, D)).astype(np.float32) for _ in range(2))
    cache = H2OCache(budget=budget, recent=recent, per_head=False)
    cache.attend(mx.array(q), mx.array(k), mx.array(v), scale=1 / math.sqrt(D), q_positions=mx.arange(n, dtype=mx.int32))
    keys = torch.tensor(k).repeat_interleave(2, dim=1)
    scores = torch.tensor(q) @ keys.transpose(2, 3) / math.sqrt(D)
    weights = torch.softmax(scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -float("inf")), dim=-1)
    theirs = H2OKVCache_LayerWise(hh_size=budget - recent, recent_size=recent)
    kept = theirs((torch.tensor(k[:, :1]), torch.tensor(v[:, :1])), weights.sum(1, keepdim=True))
    want = kept_indices(torch.tensor(k[:, :1]), kept[0])[0]
    assert held(cache) == [[want, want]]


def test_eviction_caches_really_free_memory():
    """After each step a layer holds at most `budget` keys per kv head (h2o) or budget + decoded
    (snapkv), measured as the bytes of the arrays it keeps; the rest is the int32 bookkeeping
    per kv head: positions, the record and (h2o) the float32 scores."""
    model = zoo.build("llama", preset="tiny", n_kv_heads=2, seed=4)
    cfg = model.config
    per_token = 2 * cfg.n_kv_heads * cfg.head_dim * 4  # fp32 keys + values of one layer
    tokens = [(7 * i * i + 3) % cfg.vocab_size for i in range(60)]
    for name, options, bound, scored in [("h2o", dict(budget=16, recent=4), lambda decoded: 16, True),
                                         ("snapkv", dict(budget=16, window=4), lambda decoded: 16 + decoded, False)]:
        cache = caches.make(name, model, **options)
        model(mx.array([tokens[:40]]), cache)
        for i, t in enumerate(tokens[40:]):
            model(mx.array([[t]]), cache)
            for layer in cache:
                kv = layer.keys.nbytes + layer.values.nbytes
                assert layer.keys.shape == (1, cfg.n_kv_heads, layer.size(), cfg.head_dim)
                assert kv == layer.size() * per_token <= bound(i + 1) * per_token
                flags = 4 if scored else 8  # evicted (and snapkv: where it compressed), int32 each
                book = 4 * cfg.n_kv_heads * (layer.size() * (2 if scored else 1) + layer.offset) + flags
                assert layer.nbytes - kv == book


# -- SnapKV ---------------------------------------------------------------------------------


def snapkv_update_kv(key_states, query_states, value_states, window_size, max_capacity_prompt, kernel_size):
    """Transcribed from FasterDecoding/SnapKV snapkv/monkeypatch/snapkv_utils.py (avgpool)."""
    bsz, num_heads, q_len, head_dim = query_states.shape
    if q_len < max_capacity_prompt:
        return key_states, value_states
    attn_weights = torch.matmul(query_states[..., -window_size:, :], key_states.transpose(2, 3)) / math.sqrt(head_dim)
    mask = torch.full((window_size, window_size), torch.finfo(attn_weights.dtype).min)
    mask_cond = torch.arange(mask.size(-1))
    mask.masked_fill_(mask_cond < (mask_cond + 1).view(mask.size(-1), 1), 0)
    attn_weights[:, :, -window_size:, -window_size:] += mask[None, None, :, :]
    attn_weights = torch.softmax(attn_weights, dim=-1, dtype=torch.float32)
    attn_weights_sum = attn_weights[:, :, -window_size:, :-window_size].sum(dim=-2)
    attn_cache = F.avg_pool1d(attn_weights_sum, kernel_size=kernel_size, padding=kernel_size // 2, stride=1)
    indices = attn_cache.topk(max_capacity_prompt - window_size, dim=-1).indices
    indices = indices.unsqueeze(-1).expand(-1, -1, -1, head_dim)
    k_past_compress = key_states[:, :, :-window_size, :].gather(dim=2, index=indices)
    v_past_compress = value_states[:, :, :-window_size, :].gather(dim=2, index=indices)
    return (torch.cat([k_past_compress, key_states[:, :, -window_size:, :]], dim=2),
            torch.cat([v_past_compress, value_states[:, :, -window_size:, :]], dim=2))


def kvpress_snapkv_keep(keys, queries, window_size, kernel_size, n_kept):
    """Transcribed from NVIDIA/kvpress, kvpress/presses/snapkv_press.py, SnapKVPress
    (compute_window_attention and score; queries already rotated, so RoPE is left out) and
    kvpress/presses/scorer_press.py, ScorerPress.compress (topk of the scores, n_kept given
    directly instead of from compression_ratio): the kept indices [B, Hkv, n_kept]."""
    bsz, num_key_value_heads, k_len, head_dim = keys.shape
    num_key_value_groups = queries.shape[1] // num_key_value_heads
    query_states = queries[:, :, -window_size:]
    key_states = keys.repeat_interleave(num_key_value_groups, dim=1)  # repeat_kv
    attn_weights = torch.matmul(query_states, key_states.transpose(2, 3)) / math.sqrt(head_dim)
    attention_mask = torch.ones_like(attn_weights) * float("-inf")
    attention_mask = torch.triu(attention_mask, diagonal=k_len - window_size + 1)
    attn_weights += attention_mask
    attn_weights = torch.nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query_states.dtype)
    attn_weights = attn_weights[..., :-window_size]
    scores = attn_weights.mean(dim=-2)
    scores = F.avg_pool1d(scores, kernel_size=kernel_size, padding=kernel_size // 2, stride=1)
    scores = scores.view(bsz, num_key_value_heads, num_key_value_groups, k_len - window_size)
    scores = scores.mean(2)
    scores = F.pad(scores, (0, window_size), value=scores.max().item() + 1)
    return scores.topk(n_kept, dim=-1).indices


def snapkv_compressed(q, k, v, budget, window, kernel, per_head=True):
    """Our cache fed the prompt q, k, v, then one decoded token (it compresses): its positions."""
    n, D = k.shape[2], k.shape[3]
    cache = SnapKVCache(budget=budget, window=window, kernel_size=kernel, per_head=per_head)
    cache.attend(mx.array(q), mx.array(k), mx.array(v), scale=1 / math.sqrt(D),
                 q_positions=mx.arange(n, dtype=mx.int32))  # the prompt
    cache.attend(mx.array(q[:, :, :1]), mx.array(k[:, :, :1]), mx.array(v[:, :, :1]), scale=1 / math.sqrt(D),
                 q_positions=mx.array([n], dtype=mx.int32))  # decoding starts: it compresses
    assert cache.keys.shape == (k.shape[0], k.shape[1], budget + 1, D)
    return held(cache)


@pytest.mark.parametrize("budget,window,kernel", [(10, 4, 5), (12, 3, 3), (8, 2, 1), (16, 8, 7)])
def test_snapkv_compresses_per_head_to_the_keys_snapkv_reference_code_keeps(budget, window, kernel):
    """FasterDecoding/SnapKV's SnapKVCluster.update_kv (MHA: one choice per head), 3 heads."""
    n, D, H = 32, 16, 3
    q, k, v = draws(budget * window + kernel, n, H=H, D=D)
    kept_k, _ = snapkv_update_kv(torch.tensor(k), torch.tensor(q), torch.tensor(v), window, budget, kernel)
    theirs = [sorted(idx) for idx in kept_indices(torch.tensor(k), kept_k)]
    assert snapkv_compressed(q, k, v, budget, window, kernel) == [[t + [n] for t in theirs]]


@pytest.mark.parametrize("heads", [(4, 2), (2, 1), (3, 3)], ids=["GQA", "MQA", "MHA"])
@pytest.mark.parametrize("budget,window,kernel", [(10, 4, 5), (8, 2, 1)])
def test_snapkv_keeps_what_kvpress_snapkv_press_keeps(budget, window, kernel, heads):
    """kvpress's SnapKVPress on grouped heads (the window's weights averaged over each group's
    query heads), on two rows: the same kept indices per row and kv head."""
    Hq, Hkv = heads
    n, D = 28, 8
    rng = np.random.default_rng(budget + 3 * Hq + Hkv)
    q = rng.standard_normal((2, Hq, n, D)).astype(np.float32)
    k, v = (rng.standard_normal((2, Hkv, n, D)).astype(np.float32) for _ in range(2))
    theirs = kvpress_snapkv_keep(torch.tensor(k), torch.tensor(q), window, kernel, budget).sort(dim=-1).values
    want = [[row + [n] for row in rows] for rows in theirs.tolist()]
    assert snapkv_compressed(q, k, v, budget, window, kernel) == want


def test_snapkv_pool_is_torch_avg_pool1d():
    votes = np.random.default_rng(0).random(17).astype(np.float32)
    for kernel in (1, 3, 5, 7):
        theirs = F.avg_pool1d(torch.tensor(votes)[None], kernel_size=kernel, padding=kernel // 2, stride=1)[0]
        np.testing.assert_allclose(np.array(pooled_votes(mx.array(votes), kernel)), theirs.numpy(), atol=1e-6)


# -- KIVI -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4])
def test_kivi_bytes_against_fp16(bits):
    """Quantized part: D * bits / 8 per key and value, plus fp16 scale and bias per channel per
    key group and per value group; the residual window in fp16."""
    model = zoo.build("llama", preset="tiny", n_kv_heads=2, seed=4, dtype=mx.float16)
    cfg = model.config
    n, G, R = 200, 32, 32
    cache = caches.make("kivi", model, bits=bits, group_size=G, residual=R)
    model(mx.array([[(5 * i + 1) % cfg.vocab_size for i in range(n)]]), cache)
    D, H = cfg.head_dim, cfg.n_kv_heads
    nk, nv = (n - R) // G * G, n - R
    want = H * (nk * D * bits // 8 + 2 * 2 * D * nk // G  # keys: packed + scale/bias per channel and group
                + nv * D * bits // 8 + 2 * 2 * nv * D // G  # values: packed + scale/bias per group
                + 2 * D * ((n - nk) + (n - nv)))  # the exact window, fp16
    assert cache[0].nbytes == want
    fp16 = H * n * D * 2 * 2
    assert cache[0].nbytes < (0.45 if bits == 4 else 0.35) * fp16


def kivi_quant_dequant_kcache(k, group_size, bits):
    """Transcribed from jy-yuan/KIVI, quant/new_pack.py, quant_and_pack_kcache (without the
    packing) and unpack_and_dequant_kcache: k [B, nh, T, D], per channel over groups of
    group_size tokens."""
    B, nh, T, D = k.shape
    num_groups = T // group_size
    new_shape = (B, nh, num_groups, group_size, D)
    max_int = 2 ** bits - 1
    data = k.view(new_shape)
    mn = torch.min(data, dim=-2, keepdim=True)[0]
    mx_ = torch.max(data, dim=-2, keepdim=True)[0]
    scale = (mx_ - mn) / max_int
    data = data - mn
    data.div_(scale)
    data = data.clamp_(0, max_int).round_().to(torch.int32)
    return (data * scale + mn).view(k.shape)


def kivi_quant_dequant_vcache(v, group_size, bits):
    """Transcribed from jy-yuan/KIVI, quant/new_pack.py, quant_and_pack_vcache (without the
    packing) and unpack_and_dequant_vcache: v [B, nh, T, D], per token over groups of
    group_size features."""
    shape = v.shape
    num_groups = shape[-1] // group_size
    new_shape = (shape[:-1] + (num_groups, group_size))
    max_int = 2 ** bits - 1
    data = v.view(new_shape)
    mn = torch.min(data, dim=-1, keepdim=True)[0]
    mx_ = torch.max(data, dim=-1, keepdim=True)[0]
    scale = (mx_ - mn) / max_int
    data = data - mn
    data.div_(scale)
    data = data.clamp_(0, max_int).round_().to(torch.int32)
    return (data * scale + mn).view(shape)


@pytest.mark.parametrize("bits,group_size,D", [(2, 4, 8), (4, 8, 16), (4, 32, 64), (2, 32, 32)])
def test_kivi_stores_what_kivi_quantizer_gives(bits, group_size, D):
    """What the cache stores for the tokens it quantized is KIVI's min-max quantization of
    the same keys (per channel, token groups) and values (per token), and the rest is exact."""
    rng = np.random.default_rng(bits * D + group_size)
    n, R = 5 * group_size + 3, group_size + 1
    k, v = ((rng.standard_normal((1, 2, n, D)) * (1 + np.arange(D))).astype(np.float32) for _ in range(2))
    cache = caches.get("kivi")(bits=bits, group_size=group_size, residual=R)
    for a, b in [(0, 7), (7, 8), (8, n)]:
        cache.update_and_fetch(mx.array(k[:, :, a:b]), mx.array(v[:, :, a:b]))
    got_k, got_v = (np.array(a) for a in cache.stored_kv())
    nk, nv = (n - R) // group_size * group_size, n - R
    want_k = kivi_quant_dequant_kcache(torch.tensor(k[:, :, :nk]), group_size, bits).numpy()
    want_v = kivi_quant_dequant_vcache(torch.tensor(v[:, :, :nv]), group_size, bits).numpy()
    np.testing.assert_allclose(got_k[:, :, :nk], want_k, atol=1e-5 * np.abs(k).max(), rtol=0)
    np.testing.assert_allclose(got_v[:, :, :nv], want_v, atol=1e-5 * np.abs(v).max(), rtol=0)
    assert np.array_equal(got_k[:, :, nk:], k[:, :, nk:]) and np.array_equal(got_v[:, :, nv:], v[:, :, nv:])
