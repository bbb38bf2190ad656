"""Putting a checkpoint's tensors into a model: names, layouts, and strict checking.

A `CheckpointLayout` says how one file format names and lays out a family's tensors (HF's
GPT-2 stores Conv1D weights transposed; GGUF renames everything). `assign_weights` maps a
file's tensors onto the model and refuses missing, unexpected or mis-shaped ones, naming
them as the file names them, before the model is touched.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten


class CheckpointLayout:
    """Identity mapping between a file's tensors and the model's parameters.

    `name` below is always a model parameter name (as in `tree_flatten(model.parameters())`).
    """

    def model_name(self, file_name: str) -> Optional[str]:
        """The parameter a file tensor becomes, or None for tensors that are not weights."""
        return file_name

    def file_name(self, name: str) -> str:
        """The name the file uses for a parameter (for saving and for error messages)."""
        return name

    def file_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape the file stores for a parameter of `shape`."""
        return shape

    def from_file(self, name: str, array: mx.array) -> mx.array:
        """A file tensor in the model's layout."""
        return array

    def to_file(self, name: str, array: mx.array) -> mx.array:
        """A parameter in the file's layout (inverse of `from_file`)."""
        return array


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def assign_weights(
    model: nn.Module,
    file_weights: dict[str, mx.array],
    layout: CheckpointLayout,
    source: str,
    dtype: Optional[mx.Dtype] = None,
    evaluate: bool = True,
) -> None:
    """Load `file_weights` into `model` through `layout`, all or nothing.

    Raises ValueError naming missing, unexpected or mis-shaped tensors (by their file names)
    before any parameter changes. `dtype` casts floating-point tensors; None keeps them as stored.
    `evaluate=False` leaves the parameters lazy (still to be read from the files), so a caller
    can keep slices of them without ever holding every tensor (zoo.distributed).
    """
    expected = dict(tree_flatten(model.parameters()))
    mapped: dict[str, tuple[str, mx.array]] = {}
    unexpected = []
    for file_name, array in file_weights.items():
        name = layout.model_name(file_name)
        if name is None:
            continue
        if name not in expected:
            unexpected.append(file_name)
        elif name in mapped:
            raise ValueError(f"{source}: tensors {mapped[name][0]!r} and {file_name!r} both map to {name!r}")
        else:
            mapped[name] = (file_name, array)
    missing = sorted(layout.file_name(n) for n in expected if n not in mapped)
    problems = []
    if missing:
        problems.append(f"missing tensor(s) {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected tensor(s) {_listing(sorted(unexpected))} (not part of this model)")
    for name, (file_name, array) in sorted(mapped.items()):
        want = layout.file_shape(name, tuple(expected[name].shape))
        if tuple(array.shape) != want:
            problems.append(f"tensor {file_name!r} has shape {tuple(array.shape)}, the config needs {want}")
    if problems:
        raise ValueError(f"{source} does not match the model's config: " + "; ".join(problems))
    new = []
    for name, (file_name, array) in mapped.items():
        packed = not mx.issubdtype(expected[name].dtype, mx.floating)  # a quantized layer's uint32 weight
        if packed and array.dtype != expected[name].dtype:
            raise ValueError(f"{source}: tensor {file_name!r} has dtype {array.dtype}; this quantized "
                             f"layer stores {expected[name].dtype}")
        if not packed and not mx.issubdtype(array.dtype, mx.floating):
            raise ValueError(f"{source}: tensor {file_name!r} has dtype {array.dtype}; weights must be floating point")
        array = layout.from_file(name, array)
        if dtype is not None and not packed:
            array = array.astype(dtype)
        new.append((name, array))
    model.update(tree_unflatten(new))
    if evaluate:
        mx.eval(model.parameters())


def file_weights_of(model: nn.Module, layout: CheckpointLayout) -> dict[str, mx.array]:
    """The model's parameters under their file names and in the file's layout."""
    return {layout.file_name(n): layout.to_file(n, a) for n, a in tree_flatten(model.parameters())}
