"""Verbatim recall of a memorised page: teacher-forced next-character accuracy over the page
(128-character windows) and how much of the first window greedy decoding reproduces from its
first 16 characters.   python scripts/recall.py MODEL_FOLDER PAGE.txt"""

from __future__ import annotations

# isort: off
import zoo  # first: it loads OpenBLAS for MLX, which works only before mlx.core (kvzoo/blas.py)
# isort: on

import sys

import mlx.core as mx


def main(model_path: str, page_path: str) -> None:
    model, tokenizer = zoo.load(model_path)
    with open(page_path, encoding="utf-8") as f:
        text = f.read()
    ids = tokenizer.encode(text)
    block = model.config.max_positions
    correct = total = 0
    for start in range(0, len(ids) - 1, block):
        window = ids[start: start + block + 1]
        logits = model(mx.array([window[:-1]]))[0]  # [T, V]
        correct += (mx.argmax(logits, axis=-1) == mx.array(window[1:])).sum().item()
        total += len(window) - 1
    prompt = ids[:16]
    greedy = [t for t, _ in zoo.generate_step(model, prompt, max_tokens=block - 16)]
    same = next((i for i, (a, b) in enumerate(zip(greedy, ids[16:block])) if a != b), len(greedy))
    print(f"teacher-forced next-character accuracy: {correct / total:.3f} ({correct}/{total})")
    print(f"greedy from the first 16 characters reproduces the next {same} of {block - 16} verbatim:")
    print(repr(tokenizer.decode(prompt + greedy)))


if __name__ == "__main__":
    main(*sys.argv[1:3])
