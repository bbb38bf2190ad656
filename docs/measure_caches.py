"""Measure what docs/caches.md reports: bytes per token of every cache, and the drift of the
approximate caches from the true uncached model.

    PYTHONPATH=. python docs/measure_caches.py [--data ../shared/data]

Bytes: each cache filled with random keys/values of the `llama` `small` preset's shape
(12 layers, 4 kv heads of 64) in fp32 and fp16. Drift: the rotating cache on the real
stories260K model (its head size, 8, is below mx.quantize's smallest group of 32, so the
quantized cache cannot serve it); the quantized cache on a random-weight llama with head
size 64. Drift = the cache's logits vs the uncached model's over every position of the
sequence, fed as a 16-token prompt then one token at a time.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import zoo  # first: it loads OpenBLAS for MLX, which works only before mlx.core (kvzoo/blas.py)
import mlx.core as mx

import caches


def bytes_per_token(tokens: int = 1000) -> list[tuple[str, str, float, float]]:
    cfg = zoo.make_config("llama", preset="small")
    rows = []
    setups = [
        ("concat", {}), ("preallocated", {}), ("preallocated", {"capacity": tokens}),
        ("rotating", {"max_size": 512, "keep": 4}),
        ("quantized", {"bits": 8, "group_size": 64}), ("quantized", {"bits": 4, "group_size": 64}),
        ("quantized", {"bits": 4, "group_size": 32}), ("quantized", {"bits": 2, "group_size": 64}),
        ("quantized", {"group_size": 64, "key_bits": 8, "value_bits": 4}),
    ]
    for name, options in setups:
        per_dtype = []
        for dtype in (mx.float32, mx.float16):
            total = 0
            for layer in range(cfg.n_layers):
                cache = caches.get(name)(**options)
                kv = mx.random.normal((1, cfg.n_kv_heads, tokens, cfg.head_dim),
                                      key=mx.random.key(layer)).astype(dtype)
                cache.update_and_fetch(kv, kv)
                mx.eval(cache.state)
                total += cache.nbytes
            per_dtype.append(total / tokens)
        label = ", ".join(f"{k}={v}" for k, v in options.items())
        rows.append((name, label, *per_dtype))
    return rows


def load_stories260k(path: Path):
    """stories260K.gguf as a kvzoo llama (traditional RoPE: llama.cpp permuted q/k)."""
    weights, meta = mx.load(str(path), return_metadata=True)
    n_layers = int(meta["llama.block_count"].item())
    model = zoo.from_config(zoo.make_config(
        "llama", vocab_size=weights["token_embd.weight"].shape[0],
        d_model=int(meta["llama.embedding_length"].item()), n_layers=n_layers,
        n_heads=int(meta["llama.attention.head_count"].item()),
        n_kv_heads=int(meta["llama.attention.head_count_kv"].item()),
        d_ff=int(meta["llama.feed_forward_length"].item()), rope_traditional=True,
        norm_eps=float(meta["llama.attention.layer_norm_rms_epsilon"].item()),
        max_positions=int(meta["llama.context_length"].item()), tie_embeddings=True))
    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
             "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    mapped = {"model.embed_tokens.weight": weights["token_embd.weight"],
              "model.norm.weight": weights["output_norm.weight"]}
    for i in range(n_layers):
        for gguf, ours in names.items():
            mapped[f"model.layers.{i}.{ours}.weight"] = weights[f"blk.{i}.{gguf}.weight"]
    model.load_weights(list(mapped.items()), strict=True)
    mx.eval(model.parameters())
    return model


def greedy_text(model, prompt: list[int], n: int) -> list[int]:
    tokens = list(prompt)
    for token, _ in zoo.generate_step(model, prompt, cache="preallocated", max_tokens=n):
        tokens.append(token)
    return tokens


def drift(model, tokens: list[int], name: str, options: dict, prompt: int = 16) -> dict:
    """Cached (prompt, then one token at a time) vs the true uncached logits, every position."""
    cache = caches.make(name, model, **options)
    outs = [model(mx.array(tokens[:prompt])[None], cache)[0]]
    for t in tokens[prompt:]:
        outs.append(model(mx.array([[t]]), cache)[0])
        mx.eval(outs[-1])
    got = mx.concatenate(outs)
    true = model(mx.array(tokens)[None])[0]
    ref = model(mx.array(tokens)[None], reference=cache[0].reference)[0]
    logp, logq = (x - mx.logsumexp(x, -1, keepdims=True) for x in (true, got))
    kl = (mx.exp(logp) * (logp - logq)).sum(-1)
    return {
        "vs_ref": mx.abs(got - ref).max().item(),
        "max_dlogit": mx.abs(got - true).max().item(),
        "mean_kl": kl.mean().item(),
        "max_kl": kl.max().item(),
        "top1": (mx.argmax(got, -1) == mx.argmax(true, -1)).mean().item(),
        "bytes_per_token": sum(c.nbytes for c in cache) / len(tokens),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    args = parser.parse_args()

    print("## bytes per token, llama small shape (12 layers, 4 kv heads x 64), 1000 tokens\n")
    print("| cache | options | fp32 | fp16 |\n| --- | --- | ---: | ---: |")
    for name, label, fp32, fp16 in bytes_per_token():
        print(f"| {name} | {label} | {fp32:,.0f} | {fp16:,.0f} |")

    stories = Path(args.data) / "stories260K" / "stories260K.gguf"
    if stories.exists():
        model = load_stories260k(stories)
        tokens = greedy_text(model, [1, 403, 407, 261, 378], 395)  # BOS "Once upon a time"
        print(f"\n## rotating drift, stories260K, {len(tokens)} tokens of its own greedy story\n")
        print("| options | max abs dlogit | mean KL | max KL | top-1 agree | vs reference |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for options in ({"max_size": 64, "keep": 0}, {"max_size": 64, "keep": 4},
                        {"max_size": 128, "keep": 0}, {"max_size": 128, "keep": 4},
                        {"max_size": 256, "keep": 4}):
            d = drift(model, tokens, "rotating", options)
            print(f"| {options} | {d['max_dlogit']:.3f} | {d['mean_kl']:.4f} | {d['max_kl']:.3f} "
                  f"| {100 * d['top1']:.1f}% | {d['vs_ref']:.1e} |")

    model = zoo.build("llama", preset="tiny", head_dim=64, seed=0)
    tokens = [(7 + 31 * i * i + 5 * i) % model.config.vocab_size for i in range(256)]
    print("\n## quantized drift, random-weight llama tiny (head size 64, 2 layers), 256 tokens\n")
    print("| options | max abs dlogit | mean KL | max KL | top-1 agree | vs reference |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for options in ({"bits": 8, "group_size": 64}, {"bits": 6, "group_size": 64},
                    {"bits": 4, "group_size": 32}, {"bits": 4, "group_size": 64},
                    {"bits": 3, "group_size": 64}, {"bits": 2, "group_size": 64},
                    {"group_size": 64, "key_bits": 8, "value_bits": 4}):
        d = drift(model, tokens, "quantized", options)
        print(f"| {options} | {d['max_dlogit']:.3f} | {d['mean_kl']:.5f} | {d['max_kl']:.4f} "
              f"| {100 * d['top1']:.1f}% | {d['vs_ref']:.1e} |")


if __name__ == "__main__":
    main()
