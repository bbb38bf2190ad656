"""`kvzoo train`: next-token training on a text file into a folder zoo.load reads back.

    kvzoo train --data input.txt --tokenizer char --family gpt2 --positional learned \
        --n-layers 4 --n-heads 4 --n-kv-heads 4 --d-model 64 --block-size 128 --batch-size 32 \
        --steps 3000 --lr 3e-3 --dropout 0.1 --seed 0 --out runs/char

The loss goes to stdout at every eval interval, a progress bar with tokens/s to stderr, and
the last stdout line is `final loss X` (the last step's training loss).
"""

from __future__ import annotations

import argparse

HELP = "train a model on a text file (char, byte or a loaded tokenizer) into a zoo.load-able folder"


def _optional_float(text: str):
    return None if text.lower() in ("none", "off", "0") else float(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..training import TrainSettings

    d = TrainSettings(data="", out="")
    a = parser.add_argument
    a("--data", required=True, help="UTF-8 text file to train on")
    a("--out", required=True, help="output folder (config.json, model.safetensors, tokenizer, optimizer state)")
    a("--tokenizer", default=d.tokenizer, help="char | byte | a tokenizer folder or SentencePiece .model (default char)")
    a("--family", default=d.family, help="model family: gpt2 | llama (default gpt2)")
    a("--positional", default=d.positional, help="positional scheme: learned | rope | alibi (default learned)")
    a("--n-layers", type=int, default=d.n_layers)
    a("--n-heads", type=int, default=d.n_heads)
    a("--n-kv-heads", type=int, default=None, help="key/value heads (default: n-heads, MHA; 1: MQA)")
    a("--d-model", type=int, default=d.d_model)
    a("--d-ff", type=int, default=None, help="MLP width (default: the family's)")
    a("--block-size", type=int, default=d.block_size, help="context length trained on (also the learned table's size)")
    a("--activation", default=None, help="gelu (exact) | gelu_tanh | relu | silu (default: the family's)")
    a("--dropout", type=float, default=d.dropout)
    a("--untied", action="store_true", help="a separate LM head instead of the tied embedding")
    a("--pad-vocab", type=int, default=None, metavar="N", help="pad the embedding rows to a multiple of N (e.g. 64)")
    a("--init-std", type=float, default=d.init_std)
    a("--batch-size", type=int, default=d.batch_size)
    a("--steps", type=int, default=d.steps, help="optimizer steps in total (with --resume: the new total)")
    a("--lr", type=float, default=d.lr, help="peak AdamW learning rate")
    a("--min-lr", type=float, default=None, help="end of the cosine decay (default lr / 10)")
    a("--warmup", type=int, default=d.warmup, help="linear warmup steps")
    a("--beta1", type=float, default=d.beta1)
    a("--beta2", type=float, default=d.beta2)
    a("--weight-decay", type=float, default=d.weight_decay)
    a("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    a("--grad-clip", type=_optional_float, default=d.grad_clip, help="clip the gradient norm (0: off)")
    a("--eval-interval", type=int, default=d.eval_interval, help="steps between held-out evaluations")
    a("--eval-batches", type=int, default=d.eval_batches)
    a("--val-fraction", type=float, default=d.val_fraction, help="held-out tail of the text (0: none)")
    a("--seed", type=int, default=d.seed)
    a("--max-minutes", type=float, default=None, help="stop after this many minutes (the cosine then follows time); 0: no limit")
    a("--resume", action="store_true", help="continue the run saved in --out")
    a("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ..training import train

    names = ("tokenizer", "family", "positional", "n_layers", "n_heads", "n_kv_heads", "d_model", "d_ff",
             "block_size", "activation", "dropout", "pad_vocab", "init_std", "batch_size", "steps", "lr",
             "min_lr", "warmup", "beta1", "beta2", "weight_decay", "grad_accum", "grad_clip",
             "eval_interval", "eval_batches", "val_fraction", "seed", "max_minutes")
    settings = {n: getattr(args, n) for n in names}
    settings.update(tie_embeddings=not args.untied, progress=not args.no_progress)
    if args.resume:  # only what was given explicitly overrides the saved run
        defaults = _defaults()
        settings = {k: v for k, v in settings.items() if defaults.get(k, object()) != v}
    train(args.data, args.out, resume=args.resume, **settings)
    return 0


def _defaults() -> dict:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    values = vars(parser.parse_args(["--data", "x", "--out", "x"]))
    values["tie_embeddings"] = not values.pop("untied")
    values["progress"] = not values.pop("no_progress")
    return values
