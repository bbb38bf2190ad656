"""Scaled dot-product attention with the mask and bias a cache or reference asks for.

One function serves both the cached path (`Cache.attend`) and the uncached oracle, so the two
can only differ in the keys they attend to, never in how they attend.
"""

from __future__ import annotations

from typing import Callable, Optional

import mlx.core as mx

from .reference import Reference

# bias(q_positions, k_positions) -> additive bias broadcastable to [B, H, Lq, Lk], or None
Bias = Callable[[mx.array, mx.array], Optional[mx.array]]


def scaled_dot_product_attention(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    *,
    scale: float,
    q_positions: mx.array,
    k_positions: Optional[mx.array],
    reference: Reference,
    bias: Optional[Bias] = None,
    visible: Optional[mx.array] = None,
) -> mx.array:
    """Attend `queries` [B, Hq, Lq, D] to `keys`/`values` [B, Hkv, Lk, D].

    `k_positions=None` promises the keys hold positions 0..Lk-1 in order and the queries are the
    last Lq of them; with a causal reference and no bias that is MLX's lower-right aligned
    "causal" mask (or no mask for one query), so nothing is materialised. Otherwise the boolean
    visibility comes from `reference.mask(q_positions, k_positions)` (through `visibility`; or
    `visible`, when the caller already has it for these positions) and the bias is added where
    visible.
    """
    if k_positions is None:
        if reference.causal and bias is None:
            if queries.shape[-2] > 1:
                return mx.fast.scaled_dot_product_attention(
                    queries, keys, values, scale=scale, mask="causal"
                )
            return fast_sdpa(queries, keys, values, scale=scale)  # one query sees every key
        k_positions = mx.arange(keys.shape[-2], dtype=mx.int32)
    if visible is not None:  # the caller built it for these positions (Cache.rows_visibility)
        mask = visible
    else:
        mask = visibility(reference, q_positions, k_positions)  # bool [Lq, Lk], [B, Lq, Lk] or [B|1, Hkv, Lq, Lk]
    mask = heads_mask(mask, queries.shape[1])  # [B|1, 1 | Hq, Lq, Lk] (or [Lq, Lk])
    if bias is not None:
        additive = head_bias(bias, q_positions, k_positions, queries.shape[1])
        if additive is not None:
            floor = mx.array(-float("inf"), dtype=queries.dtype)
            mask = mx.where(mask, additive.astype(queries.dtype), floor)
    return fast_sdpa(queries, keys, values, scale=scale, mask=mask)


def visibility(reference: Reference, q_positions: mx.array, k_positions: mx.array) -> mx.array:
    """Boolean visibility [Lq, Lk] (or [B, Lq, Lk] for rows with their own positions): the
    reference's mask, and for rows of a ragged batch the rule for left padding.

    In a ragged batch (positions [B, L], see Cache.prepare_rows) a negative position marks a
    padding slot. Padding is never attended: real queries see no key with a negative position.
    A padding query sees only itself (the key at its own position), so that its softmax has
    one finite term; its output is never read by a real query, so the rows' results are those
    of each row alone.
    """
    mask = reference.mask(q_positions, k_positions)
    if q_positions.ndim < 2 and k_positions.ndim != 2:
        return mask  # one sequence for every row (keys per head or not): no padding
    q, k = q_positions[..., :, None], k_positions[..., None, :]  # [B, Lq, 1], [B, 1, Lk]
    return (mask & (k >= 0)) | ((q < 0) & (k == q))


def heads_mask(mask: mx.array, n_heads: int) -> mx.array:
    """A boolean mask as attention over `n_heads` query heads reads it: [Lq, Lk] as is, rows'
    [B, Lq, Lk] -> [B, 1, Lq, Lk] (one mask for every head), and a mask per key/value head
    [B|1, Hkv, Lq, Lk] (keys that differ per head: per-head eviction) -> [B|1, n_heads, Lq, Lk],
    query head h reading kv head h // (n_heads / Hkv)."""
    if mask.ndim == 3:
        return mask[:, None]
    if mask.ndim == 4 and mask.shape[1] not in (1, n_heads):
        return mx.repeat(mask, n_heads // mask.shape[1], axis=1)
    return mask


def head_bias(bias: Bias, q_positions: mx.array, k_positions: mx.array, n_heads: int) -> Optional[mx.array]:
    """The positional bias for keys at `k_positions`: `bias(q_positions, k_positions)`, except
    for positions per row and key/value head ([B, Hkv, S], per-head eviction), where each kv
    head's keys are biased on their own (as rows: [B, S]) and its query heads keep their rows
    of the result: [B, n_heads, Lq, S]. A bias hook knows query heads, not kv heads, so it is
    asked once per kv head."""
    if k_positions.ndim != 3:
        return bias(q_positions, k_positions)
    Hkv = k_positions.shape[1]
    n_rep = n_heads // Hkv
    parts = []
    for h in range(Hkv):
        part = bias(q_positions, k_positions[:, h])  # [B, Hq | 1, Lq, S], [B, Lq, S], [Lq, S] or None
        if part is None:
            return None
        part = part[None, None] if part.ndim == 2 else part[:, None] if part.ndim == 3 else part
        if part.shape[1] == n_heads:
            part = part[:, h * n_rep : (h + 1) * n_rep]
        parts.append(mx.broadcast_to(part, (part.shape[0], n_rep, *part.shape[2:])))
    return mx.concatenate(parts, axis=1)  # [B, n_heads, Lq, S]


def fast_sdpa(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    *,
    scale: float,
    mask: Optional[mx.array] = None,
) -> mx.array:
    """mx.fast.scaled_dot_product_attention (same arguments, same result), with grouped query
    heads folded into rows for a single query on the CPU.

    MLX's CPU backend has no fused attention kernel. Its fallback serves grouped-query attention
    by broadcasting each key/value head against its n_rep query heads: n_rep * Hkv matrix
    products of one row each. With one query per head, the n_rep heads that share a key/value
    head are simply n_rep rows of one product ([B, Hkv, n_rep, D] @ keys^T), which is the same
    arithmetic in Hkv larger products: 1.5-2x faster attention at long context (measured in
    docs/performance.md). GPUs have fused kernels that handle groups themselves: left alone.

    In fp32 the folded attention is written out as MLX's fallback computes it (queries scaled,
    scores, mask, precise softmax, weights @ values) with one change: the scores come from
    keys [S, D] @ queries^T [D, n_rep] rather than queries [n_rep, D] @ keys^T, the long side
    as BLAS's M: OpenBLAS runs a product of n_rep (3-4) rows through its slow small-M path, and
    the transposed product takes half the time (same dot products; outputs bit-identical in
    the measurement, docs/performance.md "Batched decoding").
    """
    B, Hq, Lq, _ = queries.shape
    Hkv = keys.shape[1]
    if Lq != 1 or Hq == Hkv or mx.default_device() != mx.cpu:
        return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)
    n_rep = Hq // Hkv
    queries = queries.reshape(B, Hkv, n_rep, queries.shape[-1])  # [B, Hkv, n_rep, D]: rows
    if mask is not None and mask.ndim >= 3 and mask.shape[-3] == Hq:  # per-head bias [..., Hq, 1, Lk]
        mask = mask.reshape(*mask.shape[:-3], Hkv, n_rep, mask.shape[-1])  # [..., Hkv, n_rep, Lk]
    # A mask [..., 1, Lk] shared by the heads broadcasts over the n_rep rows unchanged.
    if queries.dtype == mx.float32 and keys.dtype == mx.float32:
        out = _folded_attention(queries, keys, values, scale, mask)
    else:
        out = mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)
    return out.reshape(B, Hq, 1, out.shape[-1])  # [B, Hkv, n_rep, Dv] -> [B, Hq, 1, Dv]


def _folded_attention(queries: mx.array, keys: mx.array, values: mx.array, scale: float,
                      mask: Optional[mx.array]) -> mx.array:
    """softmax(q k^T * scale, masked) v for queries [B, Hkv, n_rep, D] (each kv head's query rows)
    over keys/values [B, Hkv, S, D]: MLX's CPU fallback, scores computed as (k @ q^T)^T."""
    q = queries * mx.array(scale, queries.dtype)
    scores = (keys @ q.swapaxes(-1, -2)).swapaxes(-1, -2)  # [B, Hkv, S, n_rep] -> [B, Hkv, n_rep, S]
    if mask is not None:
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, mx.array(mx.finfo(scores.dtype).min, scores.dtype))
        else:
            scores = scores + mask.astype(scores.dtype)
    return mx.softmax(scores, axis=-1, precise=True) @ values  # [B, Hkv, n_rep, Dv]


# -- attention written out: for caches that need the weights or assign positions themselves ----


def grouped_scores(queries: mx.array, keys: mx.array, scale: float) -> mx.array:
    """queries [B, Hq, Lq, D] . keys [B, Hkv, Lk, D] -> scores [B, Hq, Lq, Lk] (query head h reads
    kv head h // (Hq / Hkv))."""
    B, Hq, Lq, D = queries.shape
    Hkv = keys.shape[1]
    q = (queries * scale).reshape(B, Hkv, Hq // Hkv, Lq, D)  # [B, Hkv, n_rep, Lq, D]
    scores = q @ keys[:, :, None].swapaxes(-1, -2)  # [B, Hkv, n_rep, Lq, Lk]
    return scores.reshape(B, Hq, Lq, keys.shape[2])


def grouped_values(weights: mx.array, values: mx.array) -> mx.array:
    """weights [B, Hq, Lq, Lk] . values [B, Hkv, Lk, Dv] -> [B, Hq, Lq, Dv]."""
    B, Hq, Lq, Lk = weights.shape
    Hkv = values.shape[1]
    out = weights.reshape(B, Hkv, Hq // Hkv, Lq, Lk) @ values[:, :, None]  # [B, Hkv, n_rep, Lq, Dv]
    return out.reshape(B, Hq, Lq, values.shape[-1])


def masked_softmax(scores: mx.array, mask: mx.array, additive: Optional[mx.array] = None) -> mx.array:
    """softmax over the last axis of scores [B, Hq, Lq, Lk] + additive bias, where `mask` (bool,
    broadcastable; [B, Lq, Lk] means one mask per row, [B|1, Hkv, Lq, Lk] one per key/value
    head: `heads_mask`) is True; zero weight elsewhere."""
    if additive is not None:  # [Hq, Lq, Lk], [Lq, Lk] or [B, 1 | Hq, Lq, Lk]: broadcasts as is
        scores = scores + additive.astype(scores.dtype)
    scores = mx.where(heads_mask(mask, scores.shape[1]), scores, mx.array(-float("inf"), scores.dtype))
    return mx.softmax(scores, axis=-1, precise=True)


Rotate = Callable[[mx.array, mx.array], mx.array]  # (x [..., L, D], contiguous positions [L]) -> x rotated


def rotation_matrices(rotate: Rotate, head_dim: int, n: int) -> mx.array:
    """The scheme's rotation at positions 0..n-1 as matrices [n, D, D] (M[p] @ x = x rotated
    at p): the identity's rows rotated as sequences, one rope call (rotation is linear)."""
    basis = mx.broadcast_to(mx.eye(head_dim)[:, None, :], (head_dim, n, head_dim))  # [D (j), n, D]
    rotated = rotate(basis, mx.arange(n, dtype=mx.int32))  # [j, p, i] = M[p][i, j]
    return rotated.transpose(1, 2, 0)  # [p, i, j]


def repositioned_attention(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    *,
    scale: float,
    q_positions: mx.array,
    reference: Reference,
    rotate: Optional[Rotate],
    bias: Optional[Bias] = None,
) -> mx.array:
    """The uncached oracle for a reference that assigns positions (`positions_as_seen`), over
    queries and keys not yet rotated: every query at the position the reference gives it, every
    key at the position it has for that query. Written plainly (a rotated copy of the keys per
    query, from the scheme's own rotation as matrices; the bias with the queries as rows): the
    cache it checks computes the same thing another way."""
    B, Hq, Lq, D = queries.shape
    Hkv, Lk = keys.shape[1], keys.shape[2]
    k_positions = mx.arange(Lk, dtype=mx.int32)
    visible = reference.mask(q_positions, k_positions)  # [Lq, Lk]
    q_seen, k_seen = reference.positions_as_seen(q_positions, k_positions)  # [Lq], [Lq, Lk]
    k_seen = mx.where(visible, k_seen, 0)  # hidden keys: any position, never read
    q = queries.reshape(B, Hkv, Hq // Hkv, Lq, D)  # [B, Hkv, n_rep, Lq, D]
    k = mx.broadcast_to(keys[:, :, None], (B, Hkv, Lq, Lk, D))  # one copy of the keys per query
    if rotate is not None:
        M = rotation_matrices(rotate, D, int(mx.maximum(q_seen.max(), k_seen.max()).item()) + 1)
        q = mx.einsum("pij,bgrpj->bgrpi", M[q_seen], q)
        k = mx.einsum("pkij,bgpkj->bgpki", M[k_seen], k)
    scores = mx.einsum("bgrpd,bgpkd->bgrpk", q * scale, k).reshape(B, Hq, Lq, Lk)
    additive = None
    if bias is not None:  # queries as rows: bias([Lq, 1], [Lq, Lk]) -> [Lq, H | 1, 1, Lk]
        rows = bias(q_seen[:, None], k_seen)
        if rows is not None:
            additive = rows[:, :, 0, :].transpose(1, 0, 2)  # [H | 1, Lq, Lk]
    weights = masked_softmax(scores, visible, additive)
    return grouped_values(weights.astype(values.dtype), values)


def mixed_attention(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    *,
    scale: float,
    q_positions: mx.array,
    reference: Reference,
    bias: Optional[Bias] = None,
) -> mx.array:
    """The uncached oracle for a reference where each query reads some keys and values rounded
    (`transform_kv`) and the others exact (`rounded_for`): the score of each (query, key) from
    the key it reads, the output from the value it reads."""
    k_positions = mx.arange(keys.shape[2], dtype=mx.int32)
    rounded_k, rounded_v = reference.transform_kv(keys, values)
    which = reference.rounded_for(q_positions, k_positions)
    if which is None:
        which = (mx.array(True), mx.array(True))
    key_r, value_r = which  # [Lq, Lk] bool
    scores = mx.where(key_r, grouped_scores(queries, rounded_k, scale), grouped_scores(queries, keys, scale))
    mask = reference.mask(q_positions, k_positions)
    additive = bias(q_positions, k_positions) if bias is not None else None
    weights = masked_softmax(scores, mask, additive)
    return (grouped_values(mx.where(value_r, weights, 0), rounded_v)
            + grouped_values(mx.where(value_r, 0, weights), values))
