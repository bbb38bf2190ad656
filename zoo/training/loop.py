"""`zoo.train`: next-token training of any family x positional scheme x head layout on a text.

    result = zoo.train(data="input.txt", tokenizer="char", family="gpt2", positional="alibi",
                       n_layers=4, n_heads=4, d_model=64, block_size=128, batch_size=32,
                       steps=3000, lr=3e-3, dropout=0.1, out="runs/char")
    model, tokenizer = zoo.load("runs/char")

Prints the loss at every eval interval (stdout), a progress bar with tokens/s (stderr), and
`final loss X` last (X: the training loss of the last step). `resume=True` continues the run
saved in `out` up to `steps`.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import mlx.core as mx
import numpy as np

from ..config import ModelConfig
from ..init import init_weights
from ..model import CausalLM
from ..registry import from_config, make_config
from ..tokenizers import Tokenizer, load_tokenizer
from ..tokenizers.simple import ByteTokenizer, CharTokenizer
from ..tokenizers.spm import load_sentencepiece
from . import checkpoint
from .data import TokenData, random_windows
from .loss import lm_loss
from .optimizer import AdamW
from .schedule import learning_rate
from .step import make_step


@dataclass
class TrainSettings:
    """Every setting of a run (the `kvzoo train` flags, with `_` for `-`)."""

    data: str
    out: str
    tokenizer: str = "char"  # char | byte | a tokenizer folder (or SentencePiece .model file)
    family: str = "gpt2"
    positional: str = "learned"
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # None: n_heads (MHA)
    d_model: int = 64
    d_ff: Optional[int] = None  # None: the family's default width
    block_size: int = 128
    activation: Optional[str] = None  # None: the family's (gpt2: gelu_tanh, llama: silu)
    dropout: float = 0.0
    tie_embeddings: bool = True
    pad_vocab: Optional[int] = None  # round the embedding's rows up to a multiple of this
    init_std: float = 0.02
    batch_size: int = 32
    steps: int = 1000
    lr: float = 1e-3
    min_lr: Optional[float] = None  # None: lr / 10
    warmup: int = 0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_accum: int = 1
    grad_clip: Optional[float] = 1.0  # None or 0: no clipping
    eval_interval: int = 100
    eval_batches: int = 8
    val_fraction: float = 0.1
    seed: int = 0
    max_minutes: Optional[float] = None  # stop after this long (the cosine then runs on time); 0/None: no limit
    stop_after: Optional[int] = None  # pause after this step (resume=True continues to `steps`)
    progress: bool = True

    def check(self) -> None:
        for name in ("n_layers", "n_heads", "d_model", "block_size", "batch_size", "steps", "grad_accum",
                     "eval_interval", "eval_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.warmup < self.steps:
            raise ValueError(f"warmup must be in [0, steps), got {self.warmup} with steps {self.steps}")
        if self.pad_vocab is not None and self.pad_vocab < 1:
            raise ValueError(f"pad_vocab must be a positive multiple, got {self.pad_vocab}")
        if not Path(self.data).is_file():
            raise FileNotFoundError(f"training text {self.data} does not exist")


@dataclass
class TrainResult:
    """What a run produced: the trained model (eval mode), its tokenizer and the curve."""

    model: CausalLM
    tokenizer: Tokenizer
    out: Path
    final_loss: float
    val_loss: Optional[float]
    tokens_per_second: float
    history: list[dict[str, Any]] = field(default_factory=list)  # {step, train_loss, val_loss, lr}


def make_tokenizer(spec: str, text: str) -> Tokenizer:
    """char: the text's alphabet; byte: 256 byte ids; else a folder of tokenizer files (or a
    SentencePiece .model file)."""
    if spec == "char":
        return CharTokenizer.from_text(text)
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec)
    if path.is_file() and path.suffix == ".model":
        return load_sentencepiece(path)
    if not path.is_dir():
        raise ValueError(f"tokenizer must be 'char', 'byte' or a tokenizer folder / .model file, got {spec!r}")
    return load_tokenizer(path)


def model_config(s: TrainSettings, vocab_size: int) -> ModelConfig:
    """The model a run trains: the family's defaults with the run's shape."""
    if s.pad_vocab:
        vocab_size = s.pad_vocab * math.ceil(vocab_size / s.pad_vocab)
    overrides = dict(vocab_size=vocab_size, d_model=s.d_model, n_layers=s.n_layers, n_heads=s.n_heads,
                     n_kv_heads=s.n_kv_heads or s.n_heads, positional=s.positional,
                     max_positions=s.block_size, dropout=s.dropout, tie_embeddings=s.tie_embeddings,
                     init_std=s.init_std, d_ff=s.d_ff)
    if s.activation is not None:
        overrides["activation"] = s.activation
    return make_config(s.family, **overrides)


def new_model(config: ModelConfig, *, seed: int) -> CausalLM:
    """A freshly initialised model to train: Normal(0, init_std) matrices, embeddings and
    learned position tables (0.02 by default, as GPT-2), zero biases, unit norm scales."""
    model = from_config(config)
    init_weights(model, seed=seed, std=config.init_std)
    mx.eval(model.parameters())
    return model


def evaluate(model: CausalLM, ids: np.ndarray, s: TrainSettings) -> float:
    """Mean loss over `eval_batches` fixed random batches of `ids`, dropout off."""
    was_training = model.training
    model.eval()
    losses = [lm_loss(model, random_windows(ids, s.batch_size, s.block_size, seed=s.seed + 1, step=i))
              for i in range(s.eval_batches)]
    value = mx.mean(mx.stack(losses)).item()
    model.train(was_training)
    return value


def train(data: str, out: str, *, resume: bool = False, **settings: Any) -> TrainResult:
    """Train a model on the text file `data` and write it to the folder `out` (see TrainSettings
    for the settings; `resume=True` continues the run saved in `out`, with `steps` the new total)."""
    known = {f.name for f in fields(TrainSettings)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise TypeError(f"unknown training setting(s) {unknown}; settings: {', '.join(sorted(known))}")
    folder = Path(out)
    saved = checkpoint.load_state(folder) if resume else None
    if saved is not None:  # the saved run's settings, with the ones given now on top
        previous = {k: v for k, v in saved["settings"].items() if k != "stop_after"}
        s = TrainSettings(**{**previous, **settings, "data": data, "out": out})
    else:
        s = TrainSettings(data=data, out=out, **settings)
    s.check()
    text = Path(s.data).read_text(encoding="utf-8")
    tokenizer = load_tokenizer(folder) if saved else make_tokenizer(s.tokenizer, text)
    ids = tokenizer.encode(text, add_bos=False)
    token_data = TokenData.from_ids(ids, val_fraction=s.val_fraction, block_size=s.block_size)

    config = ModelConfig(**saved["model_config"]) if saved else model_config(s, tokenizer.vocab_size)
    model = new_model(config, seed=s.seed)
    if saved:
        from ..checkpoints.loading import load_model

        model.update(load_model(folder).parameters())
    # Dropout masks: MLX's global generator, seeded per (seed, first step); a resumed run draws
    # masks of its own (batches and weights still continue exactly).
    mx.random.seed(s.seed * 1_000_003 + start_step(saved))
    optimizer = AdamW(learning_rate=s.lr, betas=(s.beta1, s.beta2), eps=s.eps, weight_decay=s.weight_decay)
    optimizer.init(model.trainable_parameters())
    start = 0
    history: list[dict[str, Any]] = []
    if saved:
        checkpoint.load_optimizer(optimizer, folder)
        start, history = saved["step"], saved["history"]
        if start >= s.steps:
            raise ValueError(f"{folder} is already trained to step {start}; pass steps > {start} to continue")
    model.train()
    step = make_step(model, optimizer, clip=s.grad_clip or None)

    min_lr = s.lr / 10 if s.min_lr is None else s.min_lr
    tokens_per_step = s.batch_size * s.block_size * s.grad_accum
    bar = _progress(s, start)
    loss_value, timed_tokens, timed_seconds = float("nan"), 0, 0.0
    began = time.perf_counter()
    earlier = history[-1].get("seconds", 0.0) if history else 0.0  # a resumed run's time so far
    limit = s.max_minutes * 60 if s.max_minutes else None
    for i in range(start, s.steps):
        # With a time limit the schedule follows whichever runs out first, steps or time (a
        # resumed run's earlier time counts: one cosine over all of it).
        spent = earlier + time.perf_counter() - began
        at = i if limit is None else max(i, int(s.steps * spent / (earlier + limit)))
        optimizer.learning_rate = learning_rate(min(at, s.steps - 1), lr=s.lr, warmup=s.warmup,
                                                total=s.steps, min_lr=min_lr)
        batches = [random_windows(token_data.train, s.batch_size, s.block_size, s.seed, i * s.grad_accum + j)
                   for j in range(s.grad_accum)]
        tic = time.perf_counter()
        loss = step(batches)
        loss_value = loss.item()
        if i > start:  # the first step compiles
            timed_seconds += time.perf_counter() - tic
            timed_tokens += tokens_per_step
        speed = timed_tokens / timed_seconds if timed_seconds else 0.0
        if bar is not None:
            bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{speed:,.0f}", refresh=False)
            bar.update(1)
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"the loss became {loss_value} at step {i + 1}; lower --lr or clip gradients")
        out_of_time = (limit is not None and time.perf_counter() - began >= limit) or i + 1 == s.stop_after
        if (i + 1) % s.eval_interval == 0 or i + 1 == s.steps or i == 0 or out_of_time:
            val = evaluate(model, token_data.val, s) if len(token_data.val) else None
            history.append(dict(step=i + 1, train_loss=loss_value, val_loss=val,
                                lr=float(optimizer.learning_rate.item()), tokens_per_second=speed,
                                seconds=round(earlier + time.perf_counter() - began, 1)))
            _print(f"step {i + 1}: train loss {loss_value:.4f}"
                   + (f" val loss {val:.4f}" if val is not None else "") + f" tok/s {speed:,.0f}", bar)
        if out_of_time:
            why = "paused (stop_after)" if i + 1 == s.stop_after else f"time limit of {s.max_minutes} min reached"
            _print(f"{why} at step {i + 1} of {s.steps}", bar)
            break
    if bar is not None:
        bar.close()
    model.eval()
    val_loss = history[-1]["val_loss"] if history else None
    speed = timed_tokens / timed_seconds if timed_seconds else 0.0
    reached = history[-1]["step"] if history else start
    _save(model, tokenizer, optimizer, s, config, reached, history)
    if val_loss is not None:
        print(f"val loss {val_loss:.4f}")
    print(f"final loss {loss_value:.4f}")
    return TrainResult(model, tokenizer, folder, loss_value, val_loss, speed, history)


def start_step(saved: Optional[dict[str, Any]]) -> int:
    return saved["step"] if saved else 0


def _save(model, tokenizer, optimizer, s: TrainSettings, config: ModelConfig, step: int, history) -> None:
    folder = Path(s.out)
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint.save_model(model, folder)
    checkpoint.save_tokenizer(tokenizer, s.tokenizer, folder)
    checkpoint.save_optimizer(optimizer, folder)
    settings = {k: v for k, v in asdict(s).items() if k not in ("data", "out")}
    checkpoint.save_state(folder, dict(step=step, settings=settings, model_config=config.to_dict(),
                                       history=history, n_params=model.n_params,
                                       train_seconds=history[-1].get("seconds") if history else None))


def _progress(s: TrainSettings, start: int):
    if not s.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=s.steps, initial=start, file=sys.stderr, unit="step", dynamic_ncols=True,
                mininterval=1.0)


def _print(line: str, bar) -> None:
    if bar is not None:
        bar.clear()
    print(line, flush=True)
    if bar is not None:
        bar.refresh()
