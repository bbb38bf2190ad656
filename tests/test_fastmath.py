"""zoo/fastmath.py against float64 oracles nobody here wrote (numpy's exp, PyTorch's softmax and
GELU with their autograd), over dense ranges; and the training forward that uses them against
the inference forward on every positional scheme and head layout."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch

import zoo
from zoo import fastmath


def ulps(ours: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """|ours - truth| in units of float32's spacing at truth."""
    return np.abs(ours.astype(np.float64) - truth) / np.spacing(np.abs(truth).astype(np.float32))


def test_exp_within_one_and_a_half_ulp_over_its_range():
    x = np.linspace(-87.0, 88.3, 2_000_001, dtype=np.float32)
    ours = np.array(mx.compile(fastmath.exp)(mx.array(x)))
    assert ulps(ours, np.exp(x.astype(np.float64))).max() <= 1.5  # measured 1.28 (mx.exp: 64 on [-87, 87.9], inf above 88)


def test_exp_edges():
    ours = np.array(fastmath.exp(mx.array([-np.inf, -100.0, -88.0, 0.0, 89.0, np.inf], dtype=mx.float32)))
    assert ours[0] == 0.0 and ours[1] == 0.0 and ours[2] < 1e-37  # masked scores: exactly 0
    assert ours[3] == 1.0
    assert np.isinf(ours[4]) and np.isinf(ours[5])


def test_softmax_and_its_gradient_match_torch_float64():
    rng = np.random.default_rng(0)
    s = (rng.standard_normal((4, 2, 64, 64)) * 4).astype(np.float32)
    s += np.triu(np.full((64, 64), -np.inf, np.float32), 1)  # causal rows, as in training
    cot = rng.standard_normal(s.shape).astype(np.float32)
    t = torch.from_numpy(s.astype(np.float64)).requires_grad_()
    p = torch.softmax(t, -1)
    (p * torch.from_numpy(cot.astype(np.float64))).sum().backward()
    c = mx.array(cot)
    value, grad = mx.compile(mx.value_and_grad(lambda a: (fastmath.softmax(a) * c).sum()))(mx.array(s))
    assert np.abs(np.array(fastmath.softmax(mx.array(s))) - p.detach().numpy()).max() <= 1e-6
    assert np.abs(np.array(grad) - t.grad.numpy()).max() <= 1e-5
    assert abs(value.item() - (p * torch.from_numpy(cot.astype(np.float64))).sum().item()) <= 1e-3


def test_gelu_and_its_gradient_match_torch_float64():
    x = np.linspace(-10.0, 10.0, 400_001, dtype=np.float32)
    t = torch.from_numpy(x.astype(np.float64)).requires_grad_()
    torch.nn.functional.gelu(t).sum().backward()  # approximate="none": the erf form
    value = np.array(mx.compile(fastmath.gelu)(mx.array(x)))
    grad = np.array(mx.compile(mx.grad(lambda a: fastmath.gelu(a).sum()))(mx.array(x)))
    truth = torch.nn.functional.gelu(t).detach().numpy()
    assert np.abs(value - truth).max() <= 1e-6  # |x| <= 10: a few float32 ulps of the value
    assert np.abs(grad - t.grad.numpy()).max() <= 1e-6
    far = np.array(fastmath.gelu(mx.array([-30.0, 30.0])))
    assert far[0] == 0.0 and far[1] == 30.0


def test_silu_and_its_gradient_match_torch_float64():
    x = np.linspace(-30.0, 30.0, 400_001, dtype=np.float32)
    t = torch.from_numpy(x.astype(np.float64)).requires_grad_()
    torch.nn.functional.silu(t).sum().backward()
    value = np.array(mx.compile(fastmath.silu)(mx.array(x)))
    grad = np.array(mx.compile(mx.grad(lambda a: fastmath.silu(a).sum()))(mx.array(x)))
    truth = torch.nn.functional.silu(t).detach().numpy()
    assert (np.abs(value - truth) / np.maximum(np.abs(truth), 1e-30)).max() <= 5e-7
    assert np.abs(grad - t.grad.numpy()).max() <= 2e-6  # measured 1e-6 (MLX's autodiff: 5e-7)


@pytest.mark.parametrize("family, positional, kv_heads, activation", [
    ("gpt2", "learned", 4, "gelu"), ("gpt2", "alibi", 2, "gelu"), ("llama", "rope", 1, "silu"),
    ("llama", "alibi", 4, "gelu")])
def test_training_forward_equals_inference_forward(family, positional, kv_heads, activation):
    """With dropout 0 the training forward (fastmath softmax, addmm scores, GELU twin) and the
    inference forward (MLX's fused attention and kernels) agree to float32 rounding."""
    model = zoo.build(family, seed=0, vocab_size=50, d_model=32, n_layers=2, n_heads=4,
                      n_kv_heads=kv_heads, max_positions=64, positional=positional, activation=activation)
    tokens = mx.array(np.random.default_rng(1).integers(0, 50, size=(2, 40)), dtype=mx.int32)
    inference = model(tokens)
    model.train()
    training = model(tokens)
    assert np.abs(np.array(training) - np.array(inference)).max() <= 1e-5
