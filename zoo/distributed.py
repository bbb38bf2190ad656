"""Tensor parallelism over attention heads and the MLP, on MLX's own distributed layer.

    group = mx.distributed.init()            # under `mlx.launch --backend ring -n 2 ...`
    model = zoo.shard(zoo.build("llama", preset="tiny"), group)   # in place; returns it
    cache = caches.make("preallocated", model)   # each process: the cache of its own heads
    logits = model(tokens, cache)                # the same logits on every process

    model, tokenizer = zoo.load("folder", group=group)   # slices while loading (never whole)

Megatron-style, one all-sum per block half: every process holds a contiguous slice of the
query heads, the key/value heads those queries read, and a slice of the MLP's hidden units.

- attention: q/k/v projections are split by rows (column-parallel: each process computes
  its heads' queries, keys and values; GPT-2's fused `c_attn` has its q, k and v parts split
  separately), attention runs over local heads through the cache unchanged, and the output
  projection (o_proj / c_proj) is split by columns (row-parallel): each process's product is
  a share of the output and one `mx.distributed.all_sum` adds the shares.
- MLP: the first projections (gate/up, c_fc/c_gate) split by rows, the last (down_proj /
  c_proj) by columns, one all-sum.
- Output biases (o_proj, down_proj, c_proj) live on rank 0 only and are added into its share
  before the all-sum, so they count once and every rank's share sums to the true output.
- Embeddings, norms, the LM head and positions are replicated: every process computes the
  same residual stream and the same logits.
- Key/value heads: split when n_kv_heads is a multiple of the process count N; when N is a
  multiple of n_kv_heads (MQA, or GQA with few kv heads) each process keeps a copy of the one
  key/value head its query heads read, so the n_kv_heads heads are stored N / n_kv_heads
  times in all (the stated cost: every process's cache holds one kv head, not n_kv_heads / N).
  Other combinations are refused.
- Positional schemes: learned and RoPE need nothing (positions are the same on every
  process; RoPE rotates each head alone). A scheme with a per-head bias (ALiBi) is wrapped so
  that it computes the bias of the global heads and each process keeps its own heads' rows
  (`HeadSlicedPositional`): the slopes follow the head slice.
- Caches need no change: a cache stores whatever heads its layer hands it, so each process's
  cache holds exactly its heads (N times less memory when the kv heads split).

Memory per process: the attention and MLP weights / N (plus the replicated kv heads when
they are copied), plus the full embedding, norms and LM head, plus its heads' cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol

import mlx.core as mx
import mlx.nn as nn

from positional import Positional


class GroupLike(Protocol):
    """What `shard` needs of a group: an `mx.distributed.Group`, or a stand-in (tests run every
    rank's shard in one process with one) that also has `all_sum(x) -> x`."""

    def rank(self) -> int: ...
    def size(self) -> int: ...


def all_sum(x: mx.array, group: Any) -> mx.array:
    """Sum `x` over the processes of `group` (mx.distributed.all_sum, or a stand-in's)."""
    if isinstance(group, mx.distributed.Group):
        return mx.distributed.all_sum(x, group=group)
    return group.all_sum(x)


# -- which heads and units each process holds ---------------------------------------------


@dataclass(frozen=True)
class Slice:
    """What rank `rank` of `size` holds of a model with this head layout."""

    rank: int
    size: int
    q_heads: tuple[int, int]  # [start, stop) of the global query heads
    kv_heads: tuple[int, int]  # [start, stop) of the global key/value heads they read
    hidden: tuple[int, int]  # [start, stop) of the MLP's hidden units
    kv_replicated: bool  # True: kv heads are copied (N is a multiple of n_kv_heads)

    @property
    def n_heads(self) -> int:
        return self.q_heads[1] - self.q_heads[0]

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]


def plan(config: Any, rank: int, size: int) -> Slice:
    """The slice of rank `rank` among `size` processes, or ValueError naming what cannot split."""
    if not (isinstance(size, int) and size >= 1 and isinstance(rank, int) and 0 <= rank < size):
        raise ValueError(f"rank must be in [0, size) with size >= 1, got rank {rank!r} of {size!r}")
    n_heads, n_kv, d_ff = config.n_heads, config.n_kv_heads, config.d_ff
    if n_heads % size:
        raise ValueError(f"cannot split {n_heads} attention heads over {size} processes: the process "
                         f"count must divide n_heads (here: {divisors(n_heads)})")
    if d_ff % size:
        raise ValueError(f"cannot split the MLP's {d_ff} hidden units over {size} processes: the "
                         f"process count must divide d_ff (here: {divisors(d_ff)})")
    if n_kv % size and size % n_kv:
        raise ValueError(
            f"cannot split {n_kv} key/value heads over {size} processes: the process count must "
            f"divide n_kv_heads (split) or be a multiple of it (each process copies the one "
            f"key/value head its queries read); here {n_heads} query heads allow "
            f"{[n for n in divisors(n_heads) if n_kv % n == 0 or n % n_kv == 0]}"
        )
    per_q, per_ff, n_rep = n_heads // size, d_ff // size, n_heads // n_kv
    q0 = rank * per_q
    kv0, kv1 = q0 // n_rep, (q0 + per_q - 1) // n_rep + 1
    return Slice(rank, size, (q0, q0 + per_q), (kv0, kv1), (rank * per_ff, (rank + 1) * per_ff),
                 kv_replicated=n_kv % size != 0)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# -- the modules a sharded block uses -------------------------------------------------------


class RowParallelLinear(nn.Module):
    """The output half of a split: `all_sum(x_local @ W_local.T (+ bias on rank 0))`.

    `weight` [out, in / N] holds this process's input columns; the bias (when the layer has
    one) lives on rank 0 only, so it is added once and every rank's share sums to the output.
    """

    def __init__(self, weight: mx.array, bias: Optional[mx.array], group: Any):
        super().__init__()
        self.weight = weight
        if bias is not None:
            self.bias = bias
        self._group = group

    def share(self, x: mx.array) -> mx.array:
        """This process's share of the output [..., out] (before the all-sum)."""
        if "bias" in self:
            return mx.addmm(self["bias"], x, self["weight"].T)
        return x @ self["weight"].T

    def __call__(self, x: mx.array) -> mx.array:
        return all_sum(self.share(x), self._group)


class HeadSlicedPositional(Positional):
    """A scheme with a per-head bias, seen from one process: the bias of the global heads,
    rows [start, stop) kept. Positions, embeddings and rotations pass through unchanged.

    Build it with `around(inner, start, stop)`: its class then overrides the hooks `inner`'s
    class overrides and no others, so code that asks which hooks a scheme has (the streaming
    cache refuses schemes that embed positions) gets the inner scheme's answer."""

    def __init__(self, inner: Positional, start: int, stop: int):
        super().__init__()
        self.inner = inner
        self.start, self.stop = start, stop
        self.name, self.max_positions, self.uses_bias = inner.name, inner.max_positions, inner.uses_bias

    @classmethod
    def around(cls, inner: Positional, start: int, stop: int) -> "HeadSlicedPositional":
        kind = type(inner)
        if kind not in _SLICED:
            hooks = {name: _delegate(name) for name in ("embed", "rotate", "check_positions")
                     if getattr(kind, name) is not getattr(Positional, name)}
            _SLICED[kind] = type(f"HeadSliced{kind.__name__}", (cls,), hooks)
        return _SLICED[kind](inner, start, stop)

    def bias(self, q_positions, k_positions):
        full = self.inner.bias(q_positions, k_positions)  # [Hq, Lq, Lk] or [B, Hq, Lq, Lk]
        if full is None or full.ndim < 3 or full.shape[-3] == 1:
            return full  # no bias, or one shared by every head
        return full[..., self.start : self.stop, :, :]


_SLICED: dict[type, type] = {}  # scheme class -> its HeadSlicedPositional class


def _delegate(name: str):
    def hook(self, *args):
        return getattr(self.inner, name)(*args)

    hook.__name__ = name
    return hook


# -- sharding a model -----------------------------------------------------------------------


def _rows(weight: mx.array, start: int, stop: int) -> mx.array:
    return mx.contiguous(weight[start:stop])  # a copy: the full tensor can be freed


def _split_rows(linear: nn.Module, start: int, stop: int) -> None:
    """Column-parallel in place: keep output rows [start, stop) of weight and bias."""
    _require_linear(linear)
    linear.weight = _rows(linear.weight, start, stop)
    if "bias" in linear:
        linear.bias = _rows(linear.bias, start, stop)


def _row_parallel(linear: nn.Module, start: int, stop: int, rank: int, group: Any) -> RowParallelLinear:
    """Row-parallel: input columns [start, stop), the bias on rank 0 only."""
    _require_linear(linear)
    bias = linear.bias if "bias" in linear and rank == 0 else None
    return RowParallelLinear(mx.contiguous(linear.weight[:, start:stop]), bias, group)


def _require_linear(module: nn.Module) -> None:
    if type(module) is not nn.Linear:
        raise TypeError(f"zoo.shard splits nn.Linear projections, got {type(module).__name__} "
                        f"(quantized or custom layers are not supported)")


def _shard_attention(attn: nn.Module, part: Slice, head_dim: int, group: Any) -> None:
    (q0, q1), (k0, k1) = part.q_heads, part.kv_heads
    global_q = attn.n_heads * head_dim
    global_kv = attn.n_kv_heads * head_dim
    if "c_attn" in attn:  # GPT-2: one fused [q | k | v] projection; split each part alone
        _require_linear(attn.c_attn)
        rows = mx.concatenate([mx.arange(q0 * head_dim, q1 * head_dim),
                               global_q + mx.arange(k0 * head_dim, k1 * head_dim),
                               global_q + global_kv + mx.arange(k0 * head_dim, k1 * head_dim)])
        attn.c_attn.weight = mx.contiguous(attn.c_attn.weight[rows])  # [q + 2 kv local, d_model]
        if "bias" in attn.c_attn:
            attn.c_attn.bias = mx.contiguous(attn.c_attn.bias[rows])
        attn.splits = [part.n_heads * head_dim, (part.n_heads + part.n_kv_heads) * head_dim]
        attn.c_proj = _row_parallel(attn.c_proj, q0 * head_dim, q1 * head_dim, part.rank, group)
    elif "q_proj" in attn:  # Llama: separate projections
        _split_rows(attn.q_proj, q0 * head_dim, q1 * head_dim)
        _split_rows(attn.k_proj, k0 * head_dim, k1 * head_dim)
        _split_rows(attn.v_proj, k0 * head_dim, k1 * head_dim)
        attn.o_proj = _row_parallel(attn.o_proj, q0 * head_dim, q1 * head_dim, part.rank, group)
    else:
        raise TypeError(f"zoo.shard knows attention with c_attn (gpt2) or q/k/v_proj (llama), "
                        f"got {type(attn).__name__}")
    attn.n_heads, attn.n_kv_heads = part.n_heads, part.n_kv_heads


def _shard_mlp(mlp: nn.Module, part: Slice, group: Any) -> None:
    h0, h1 = part.hidden
    firsts, last = (("gate_proj", "up_proj"), "down_proj") if "down_proj" in mlp else (("c_fc", "c_gate"), "c_proj")
    if last not in mlp:
        raise TypeError(f"zoo.shard knows MLPs ending in down_proj (llama) or c_proj (gpt2), got {type(mlp).__name__}")
    for name in firsts:
        if name in mlp:
            _split_rows(mlp[name], h0, h1)
    mlp[last] = _row_parallel(mlp[last], h0, h1, part.rank, group)


def _parts(block: nn.Module) -> tuple[nn.Module, nn.Module]:
    attn = block.get("self_attn", block.get("attn"))
    if attn is None or "mlp" not in block:
        raise TypeError(f"zoo.shard knows blocks with self_attn/attn and mlp, got {type(block).__name__}")
    return attn, block.mlp


def _check_block(block: nn.Module) -> None:
    attn, mlp = _parts(block)
    names = ("c_attn", "c_proj") if "c_attn" in attn else ("q_proj", "k_proj", "v_proj", "o_proj")
    if not all(name in attn for name in names):
        raise TypeError(f"zoo.shard knows attention with c_attn/c_proj (gpt2) or q/k/v/o_proj (llama), "
                        f"got {type(attn).__name__}")
    last = "down_proj" if "down_proj" in mlp else "c_proj"
    if last not in mlp:
        raise TypeError(f"zoo.shard knows MLPs ending in down_proj (llama) or c_proj (gpt2), got {type(mlp).__name__}")
    for module in [attn[n] for n in names] + [mlp[n] for n in ("gate_proj", "up_proj", "c_fc", "c_gate", last) if n in mlp]:
        _require_linear(module)


def _replace_positional(model: nn.Module, new: Positional) -> None:
    old = model.positional
    for _, module in model.named_modules():
        for key, value in module.items():
            if value is old:
                module[key] = new
                return
    raise TypeError(f"zoo.shard cannot find where {type(model).__name__} keeps its positional scheme")


def shard(model: nn.Module, group: Optional[GroupLike] = None, *, evaluate: bool = True) -> nn.Module:
    """Split `model` in place over the processes of `group` (default: mx.distributed.init())
    and return it: this process keeps its slice of the heads and MLP units (module docstring).

    Block by block, the kept slices are copied and (with `evaluate`) evaluated, so the full
    tensors of a block can be freed before the next: a model whose weights are still lazy
    (read by `zoo.load(..., group=)`) is never whole in memory. A group of size 1 leaves the
    model as it is. Raises ValueError when the heads, kv heads or MLP do not split over the
    group (naming the counts that would), TypeError for a model it does not know.
    """
    group = mx.distributed.init() if group is None else group
    size, rank = group.size(), group.rank()
    if getattr(model, "distributed", None) is not None:
        raise ValueError("this model is already sharded (zoo.shard was called on it before)")
    cfg = model.config
    part = plan(cfg, rank, size)
    if size == 1:
        return model
    for block in model.layers:  # refuse before changing anything
        _check_block(block)
    if model.positional.uses_bias:
        _replace_positional(model, HeadSlicedPositional.around(model.positional, *part.q_heads))
    for block in model.layers:
        attn, mlp = _parts(block)
        _shard_attention(attn, part, cfg.head_dim, group)
        _shard_mlp(mlp, part, group)
        if evaluate:
            mx.eval(block.parameters())
    model.distributed = part
    model.heads_group = group  # caches.make hands it to the caches (Cache.across_heads)
    if evaluate:
        mx.eval(model.parameters())
    return model


# -- the processes -------------------------------------------------------------------------


def world() -> Any:
    """The global group of this launch (`mlx.launch` sets it up; size 1 when run alone)."""
    return mx.distributed.init()


_default: Optional[Any] = None


def enable(group: Any) -> None:
    """Make `group` the one `zoo.load` shards over when given none (the CLI calls this when
    started by mlx.launch with more than one process)."""
    global _default
    _default = group


def default_group() -> Optional[Any]:
    """The group set by `enable`, or None."""
    return _default


def shared_seed(group: Any) -> int:
    """A random seed drawn on rank 0 and sent to every process (samplers must agree)."""
    import random

    mine = random.SystemRandom().randrange(2**31) if group.rank() == 0 else 0
    return int(all_sum(mx.array(mine, dtype=mx.int32), group).item())


def weight_bytes(model: nn.Module) -> int:
    """Bytes of this process's parameters."""
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


# Environment variables a launcher sets: mlx.launch (ring, jaccl, nccl) and mpirun.
LAUNCH_VARIABLES = ("MLX_RANK", "MLX_HOSTFILE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def launched() -> bool:
    """True when this process was started by mlx.launch or mpirun."""
    import os

    return any(name in os.environ for name in LAUNCH_VARIABLES)


def setup_cli(args: Any) -> Optional[Any]:
    """What every `kvzoo` command does first: under a launcher with more than one process,
    make the global group the default of `zoo.load` (so each command loads its shard with no
    change of its own), silence every rank but 0 (uncaught errors still reach its stderr),
    send the files of a command with an `--out` folder (kvzoo study) from every rank but 0 to
    a temporary folder of their own (on one machine they would write the same files at once),
    and give a command with a `--seed` left unset one seed drawn on rank 0, so the samplers
    of all processes draw the same tokens. Returns the group, or None when run alone."""
    if not launched():
        return None
    group = world()
    if group.size() == 1:
        return None
    enable(group)
    if getattr(args, "seed", 0) is None:
        args.seed = shared_seed(group)
    if group.rank() != 0:
        import os
        import sys
        import tempfile
        import traceback

        if isinstance(getattr(args, "out", None), str):
            import atexit
            import shutil

            args.out = tempfile.mkdtemp(prefix=f"kvzoo-rank{group.rank()}-")
            atexit.register(shutil.rmtree, args.out, ignore_errors=True)

        # Silence at the file descriptors, so that writers holding sys.stderr from before
        # (a progress bar's default argument) and C code are silenced too.
        sys.stdout.flush()
        sys.stderr.flush()
        errors = os.fdopen(os.dup(2), "w")
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        sys.excepthook = lambda kind, error, tb: traceback.print_exception(kind, error, tb, file=errors)
    return group
