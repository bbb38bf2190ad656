"""The four training traps of the interview exercise, each caught by a test with a twin that
re-introduces the trap and shows the same check fails (as tests/test_seed_bugs.py does for the
decode bugs):

1. label shift: targets must be the next tokens, not the inputs;
2. positional init: a learned position table starts small (std ~0.02) and trainable;
3. causal mask: in the training forward, token j never influences positions before j;
4. the silent typos (attention scale, residual, q/k swapped, a dropped norm): one training
   step equals PyTorch/transformers' on identical weights and batch.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import zoo
import zoo.training.loss as loss_module
import zoo.training.loop as loop
from helpers.assets import require_module
from zoo.checkpoints import hf as hf_checkpoints
from zoo.checkpoints.layout import file_weights_of
from zoo.families import gpt2 as gpt2_family
from zoo.families import llama as llama_family
from zoo.training.loss import lm_loss, token_losses
from zoo.training.optimizer import AdamW
from zoo.training.step import make_step

FAMILIES_X_SCHEMES = [(f, p) for f in ("gpt2", "llama") for p in ("learned", "rope", "alibi")]


def windows(vocab: int, batch: int = 4, length: int = 17, seed: int = 0) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(0, vocab, size=(batch, length)), dtype=mx.int32)


def settings(**changes) -> loop.TrainSettings:
    return loop.TrainSettings(data="unused.txt", out="unused", **changes)


# -- 1. label shift ---------------------------------------------------------------------------

class CopyModel(nn.Module):
    """Predicts that the next token is the current one, with confidence: logits 30 * one-hot."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def __call__(self, tokens, cache=None, *, check_tokens=True):
        return 30.0 * (tokens[..., None] == mx.arange(self.vocab)).astype(mx.float32)


def check_label_shift() -> None:
    vocab = 50
    batch = windows(vocab, batch=8, length=65)
    copy_loss = lm_loss(CopyModel(vocab), batch).item()
    assert copy_loss > 20, f"a model that copies its input scores {copy_loss:.3f}: targets are not shifted"
    model = loop.new_model(loop.model_config(settings(n_layers=2, d_model=32, n_heads=4, block_size=64), vocab),
                           seed=0)
    initial = lm_loss(model, batch).item()
    assert abs(initial - math.log(vocab)) < 0.05, f"loss at initialisation {initial:.3f} != ln(V) {math.log(vocab):.3f}"


def test_targets_are_the_next_tokens():
    check_label_shift()


def test_unshifted_targets_are_caught(monkeypatch):
    monkeypatch.setattr(loss_module, "split_window", lambda w: (w[:, :-1], w[:, :-1]))
    with pytest.raises(AssertionError, match="not shifted"):
        check_label_shift()


# -- 2. positional init -----------------------------------------------------------------------

def check_positional_init(family: str) -> None:
    model = loop.new_model(loop.model_config(settings(family=family, positional="learned", n_layers=1,
                                                      d_model=64, block_size=128), 40), seed=0)
    table = model.positional.weight
    std = mx.std(table).item()
    assert 0.015 < std < 0.025, f"learned position table starts at std {std:.3f}, not about 0.02"
    trainable = dict(tree_flatten(model.trainable_parameters()))
    name = next(n for n, v in trainable.items() if v is table)  # it is a trainable parameter
    before = np.array(table)
    make_step(model, AdamW(1e-3), clip=1.0)([windows(40, length=33)])
    assert np.abs(np.array(dict(tree_flatten(model.parameters()))[name]) - before).max() > 1e-4, \
        "the position table did not move in a training step"


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_learned_positions_start_small_and_train(family):
    check_positional_init(family)


def test_position_table_at_std_one_is_caught(monkeypatch):
    init = loop.init_weights

    def unit_positions(model, *, seed, std):
        init(model, seed=seed, std=std)
        model.positional.weight = mx.random.normal(model.positional.weight.shape, key=mx.random.key(0))

    monkeypatch.setattr(loop, "init_weights", unit_positions)
    with pytest.raises(AssertionError, match="not about 0.02"):
        check_positional_init("gpt2")


# -- 3. causal mask in the training forward ---------------------------------------------------

def check_causal(family: str, scheme: str) -> None:
    model = zoo.build(family, preset="tiny", positional=scheme, seed=2)
    batch = windows(96, batch=2, length=17, seed=1)
    logits = model(batch[:, :-1])
    losses = token_losses(model, batch)
    for j in (3, 9, 15):
        changed = np.array(batch)
        changed[:, j] = (changed[:, j] + 1) % 96
        # the targets stay those of the original window: only input j changes
        inputs = mx.array(changed)[:, :-1]
        mixed = mx.concatenate([inputs, batch[:, -1:]], axis=1)
        new_logits, new_losses = model(inputs), token_losses(model, mixed)
        assert mx.abs(new_logits[:, :j] - logits[:, :j]).max().item() <= 1e-5, \
            f"changing token {j} changed the logits before it: the causal mask leaks"
        assert mx.abs(new_losses[:, : j - 1] - losses[:, : j - 1]).max().item() <= 1e-5, \
            f"changing token {j} changed earlier loss terms"
        assert mx.abs(new_logits[:, j:] - logits[:, j:]).max().item() > 1e-4  # the check can see a change


@pytest.mark.parametrize("family,scheme", FAMILIES_X_SCHEMES)
def test_training_forward_never_sees_the_future(family, scheme):
    check_causal(family, scheme)


def test_leaky_mask_is_caught(monkeypatch):
    def leaky_attend(q, k, v, ctx, cache, scale):
        q, k = ctx.positional.rotate(q, k, ctx.positions)
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)  # no mask: sees the future

    monkeypatch.setattr(gpt2_family, "attend", leaky_attend)
    with pytest.raises(AssertionError, match="causal mask leaks"):
        check_causal("gpt2", "rope")


# -- 4. the silent typos: one step against PyTorch / transformers -----------------------------

SHAPES = {
    "gpt2": dict(vocab_size=96, d_model=64, n_layers=2, n_heads=4, d_ff=128, max_positions=32,
                 activation="gelu"),
    "llama": dict(vocab_size=96, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                  max_positions=32),
}
# eps 1e-5 rather than 1e-8: GPT-2's key bias has a true gradient of zero (softmax ignores a
# shift shared by all keys), and Adam would turn float noise there into steps of +-lr.
LR, BETAS, EPS, DECAY, CLIP = 3e-3, (0.9, 0.95), 1e-5, 0.1, 1.0


def step_against_torch(family: str, tmp_path, break_model=None) -> tuple[float, float]:
    """(largest loss difference, largest parameter difference) between two AdamW steps of
    zoo's compiled step and of torch.optim.AdamW on transformers' model, same weights/batches."""
    torch = require_module("torch")
    transformers = require_module("transformers")
    model = zoo.build(family, seed=3, init_std=0.2, **SHAPES[family])
    zoo.save(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()  # no dropout
    if break_model is not None:
        break_model(model)
    params = [p for p in hf.parameters()]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": DECAY},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    torch_opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS)
    step = make_step(model, AdamW(LR, betas=BETAS, eps=EPS, weight_decay=DECAY), clip=CLIP)
    model.train()
    loss_gap = 0.0
    for seed in (0, 1):
        batch = windows(96, batch=4, length=17, seed=seed)
        ours = step([batch]).item()
        ids = torch.tensor(np.array(batch), dtype=torch.long)
        torch_opt.zero_grad()
        theirs = hf(input_ids=ids, labels=ids).loss  # transformers shifts the labels itself
        theirs.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        torch_opt.step()
        loss_gap = max(loss_gap, abs(ours - theirs.item()))
    state = hf.state_dict()
    param_gap = 0.0
    for name, value in file_weights_of(model, hf_checkpoints.layout(model.config)).items():
        key = name if name in state else "transformer." + name
        param_gap = max(param_gap, float(np.abs(np.array(value) - state[key].detach().numpy()).max()))
    return loss_gap, param_gap


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_training_step_equals_pytorch_adamw_on_transformers(family, tmp_path):
    loss_gap, param_gap = step_against_torch(family, tmp_path)
    assert loss_gap <= 1e-5 and param_gap <= 1e-5, (loss_gap, param_gap)


def scale_by_d_model(model):
    for layer in model.layers:
        (layer.attn if hasattr(layer, "attn") else layer.self_attn).scale = model.config.d_model ** -0.5


def patch(monkeypatch, cls, name, function):
    monkeypatch.setattr(cls, name, function)


TYPOS = {
    "scale 1/sqrt(d_model)": lambda mp: scale_by_d_model,
    "residual adds the normed input": lambda mp: patch(
        mp, gpt2_family.GPT2Block, "__call__",
        lambda self, x, ctx, cache: (lambda h: h + self.mlp(self.ln_2(h)))(
            self.ln_1(x) + self.attn(self.ln_1(x), ctx, cache))),
    "q used as k": lambda mp: patch(
        mp, gpt2_family, "attend",
        lambda q, k, v, ctx, cache, scale: gpt2_family.__dict__["_real_attend"](q, q, v, ctx, cache, scale)),
    "ln_2 dropped": lambda mp: patch(
        mp, gpt2_family.GPT2Block, "__call__",
        lambda self, x, ctx, cache: (lambda h: h + self.mlp(h))(x + self.attn(self.ln_1(x), ctx, cache))),
}


@pytest.mark.parametrize("typo", sorted(TYPOS))
def test_silent_typos_are_caught_by_the_pytorch_step(typo, monkeypatch, tmp_path):
    monkeypatch.setitem(gpt2_family.__dict__, "_real_attend", gpt2_family.attend)
    breaker = TYPOS[typo](monkeypatch)
    loss_gap, param_gap = step_against_torch("gpt2", tmp_path, break_model=breaker)
    assert loss_gap > 1e-3, f"{typo}: the step still matched PyTorch (loss gap {loss_gap:.2e})"


def test_llama_with_swapped_k_and_v_is_caught(monkeypatch, tmp_path):
    real = llama_family.attend
    monkeypatch.setattr(llama_family, "attend", lambda q, k, v, ctx, cache, scale: real(q, v, k, ctx, cache, scale))
    loss_gap, _ = step_against_torch("llama", tmp_path)
    assert loss_gap > 1e-3, loss_gap
