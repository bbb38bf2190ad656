"""`zoo.study`: what each cache does to a real model, in numbers (and pictures).

Modules, one idea each: spec (cache SPEC strings against the registry), perplexity (teacher
forcing through a cache in chunks), compare (KL / top-1 / delta perplexity against the exact
cache, in lockstep), needle (passkey retrieval), cost (bytes and tokens/s against context),
runner (the grid, study.json), plots (PNGs, needs matplotlib).
"""
