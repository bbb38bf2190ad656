"""What the four kvzoo packages share, with no dependency on any of them.

`kvzoo.blas` loads a fast BLAS before MLX on Linux CPU (every package calls `setup()` first);
`kvzoo.registry.Registry` is the one registry class behind every `register(name)`;
`kvzoo.plugins` imports users' plugin modules (files, modules, the `kvzoo.plugins` entry points).
Nothing here imports mlx at module level.
"""
