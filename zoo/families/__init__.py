"""The built-in model families, one file each: gpt2 and llama.

A family file holds the model (nanoGPT-style modules with HF's parameter names), its
registration (`@register_family`), its HF config.json mapping and tensor layout, and its
mlx-lm twin's config, so adding a family touches one file.
"""

from . import gpt2, llama  # noqa: F401  (register on import)
