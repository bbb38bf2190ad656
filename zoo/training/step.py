"""The compiled training step: loss and gradients by `nn.value_and_grad`, gradient clipping,
AdamW, all inside one `mx.compile` whose inputs and outputs are the model's and optimizer's
state (and MLX's random state, for dropout), as MLX documents for training loops.

With gradient accumulation the micro-batches run through a compiled loss-and-gradient
function and the summed gradients are evaluated after each one (so the graph never spans the
whole accumulation); a second compiled function averages, clips and applies them.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_map

from .loss import lm_loss

Step = Callable[[list[mx.array]], mx.array]  # micro-batches [B, T + 1] each -> mean loss


def make_step(model: nn.Module, optimizer: optim.Optimizer, *, clip: Optional[float] = None,
              loss_fn: Callable[[nn.Module, mx.array], mx.array] = lm_loss) -> Step:
    """A function that takes one optimizer step on a list of micro-batches (one per
    accumulation step) and returns their mean loss (unevaluated; state is evaluated)."""
    optimizer.init(model.trainable_parameters())
    state = [model.state, optimizer.state, mx.random.state]
    loss_and_grad = nn.value_and_grad(model, lambda windows: loss_fn(model, windows))

    def clip_and_update(grads) -> None:
        if clip is not None:
            grads, _ = optim.clip_grad_norm(grads, clip)
        optimizer.update(model, grads)

    @partial(mx.compile, inputs=state, outputs=state)
    def full_step(windows: mx.array) -> mx.array:
        loss, grads = loss_and_grad(windows)
        clip_and_update(grads)
        return loss

    @partial(mx.compile, inputs=state, outputs=state)
    def micro_step(windows: mx.array):
        return loss_and_grad(windows)

    @partial(mx.compile, inputs=state, outputs=state)
    def apply(grads, n: mx.array) -> mx.array:
        clip_and_update(tree_map(lambda g: g / n, grads))
        return n

    def step(batches: list[mx.array]) -> mx.array:
        if len(batches) == 1:
            loss = full_step(batches[0])
            mx.eval(loss, state)
            return loss
        total, summed = None, None
        for windows in batches:
            loss, grads = micro_step(windows)
            summed = grads if summed is None else tree_map(mx.add, summed, grads)
            total = loss if total is None else total + loss
            mx.eval(total, summed, state)  # bounded graph: one micro-batch at a time
        apply(summed, mx.array(len(batches), dtype=mx.float32))
        mx.eval(state)
        return total / len(batches)

    return step
