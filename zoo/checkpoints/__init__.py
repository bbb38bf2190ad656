"""Checkpoints: load HF folders and GGUF files into the zoo's families, and save them back.

loading.py (zoo.load / load_model / save), hf.py (config.json dispatch to the family files),
gguf.py (llama.cpp's files, dequantized by gguf-py), quantized.py (MLX-quantized folders, as
mlx_lm.convert --quantize writes them), layout.py (strict tensor-name and shape mapping), mlx_lm.py (the
same weights in mlx-lm's model classes).
"""

from .loading import load, load_model, save

__all__ = ["load", "load_model", "save"]
