"""Where and how models run: the device and its default dtype (device.py).

The BLAS loader lives in kvkvzoo/blas.py, because caches, positional and sampling must be able
to run it before MLX loads without importing zoo.
"""
