"""Training on MLX: `zoo.train(...)` / `kvzoo train`.

One idea per file: data (random windows, held-out split), schedule (warmup + cosine in
Python), loss (next-token cross-entropy), optimizer (PyTorch's AdamW), step (the compiled
step), checkpoint (the output folder), loop (`train`).
"""

from .loop import TrainResult, TrainSettings, train

__all__ = ["TrainResult", "TrainSettings", "train"]
