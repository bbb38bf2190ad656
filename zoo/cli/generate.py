"""`kvzoo generate`: load a checkpoint, stream a reply to stdout, report speed to stderr.

    kvzoo generate --model stories260K.gguf --prompt "Once upon a time" --max-tokens 100
    kvzoo generate --model my-hf-folder --prompt "Hello" --temp 0.8 --top-p 0.95 --seed 0 \
        --cache preallocated --cache-opt step=128
    kvzoo generate --model stories260K.gguf --prompts-file prompts.txt --batch-size 8
    kvzoo generate --model my-instruct-folder --chat --system "Be brief" --prompt "Hi"

Only the reply goes to stdout (so it can be piped); the statistics go to stderr in
mlx_lm.generate's format.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import caches
import sampling

HELP = "generate text from a checkpoint (HF folder or .gguf), streamed to stdout"


def parse_value(text: str) -> Any:
    """A --cache-opt value: int, float, bool (true/false), None (none/null), else the string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def parse_cache_options(pairs: list[str]) -> dict[str, Any]:
    """["max_size=256", "keep=4"] -> {"max_size": 256, "keep": 4}."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--cache-opt needs KEY=VALUE, got {pair!r}")
        if key.strip() in options:
            raise ValueError(f"--cache-opt {key.strip()!r} is given twice")
        options[key.strip()] = parse_value(value)
    return options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="HF-style folder (config.json + *.safetensors) or .gguf file")
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", help="prompt text ('-' reads it from stdin)")
    prompts.add_argument("--prompts-file", metavar="FILE",
                         help="one prompt per line, generated as a batch; prints one reply per line "
                              "in the file's order (inside a reply, newline written as \\n and backslash as \\\\)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="with --prompts-file: most prompts decoded together; as one ends the next joins "
                             "(continuous batching; caches without extend_rows run groups) (default: all)")
    parser.add_argument("--max-tokens", type=int, default=100, help="most tokens to generate (default 100)")
    parser.add_argument("--temp", type=float, default=0.0, help="sampling temperature; 0 is greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1: off)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (default 0: off)")
    parser.add_argument("--min-p", type=float, default=0.0, help="keep tokens at least min-p times the best (0: off)")
    parser.add_argument("--repetition-penalty", type=float, default=None,
                        help="CTRL repetition penalty (> 1 discourages repeats)")
    parser.add_argument("--repetition-context-size", type=int, default=20,
                        help="how many recent tokens the repetition penalty looks at (default 20)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    parser.add_argument("--stop", action="append", default=[], metavar="STR",
                        help="stop before this text (repeat for several)")
    parser.add_argument("--cache", default=None,
                        help=f"KV cache: {', '.join(caches.available())} (default: preallocated, or for a "
                             f"model with a sliding window a rotating cache of that window)")
    parser.add_argument("--cache-opt", action="append", default=[], metavar="KEY=VALUE",
                        help="cache option, e.g. --cache-opt step=128 (repeatable)")
    parser.add_argument("--prefill-step", type=int, default=512, help="prompt tokens per forward (default 512)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "stored", "float32", "float16", "bfloat16"],
                        help="weights and activations: auto = fastest on this device by measurement "
                             "(float32 on CPU, float16 on GPU; docs/performance.md), stored = as in the "
                             "checkpoint (default auto)")
    parser.add_argument("--no-bos", action="store_true", help="do not prepend the tokenizer's BOS token")
    parser.add_argument("--chat", action="store_true",
                        help="send the prompt as a user message through the tokenizer's chat template "
                             "(tokenizer_config.json's chat_template), with the assistant's turn opened")
    parser.add_argument("--system", default=None, metavar="TEXT", help="with --chat: a system message first")
    speculative = parser.add_mutually_exclusive_group()
    speculative.add_argument("--draft", metavar="MODEL_PATH", default=None,
                             help="speculative decoding with this smaller model (same tokenizer) drafting")
    speculative.add_argument("--prompt-lookup", metavar="N", type=int, default=None,
                             help="speculative decoding drafting by matching the last N tokens in the "
                                  "prompt and the text so far")
    parser.add_argument("--num-draft", type=int, default=4,
                        help="with --draft/--prompt-lookup: most tokens drafted per round (default 4)")


def read_stdin_prompt() -> str:
    """The prompt from stdin, without the one line ending `echo` and editors put after it."""
    text = sys.stdin.read()
    return text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text


def run(args: argparse.Namespace) -> int:
    import zoo
    from zoo.checkpoints import loading

    if args.prompts_file is not None:
        prompts = read_prompts(args.prompts_file)
        if args.draft or args.prompt_lookup is not None:
            raise ValueError("--draft/--prompt-lookup decode one prompt at a time; use --prompt")
        if args.batch_size is not None and args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    elif args.batch_size is not None:
        raise ValueError("--batch-size applies to --prompts-file")
    prompt = (read_stdin_prompt() if args.prompt == "-" else args.prompt) if args.prompt is not None else None
    cache_options = parse_cache_options(args.cache_opt)
    # Check the options before the (possibly slow) load; stream_generate checks them all again.
    unknown = sorted(set(cache_options) - set(caches.options_of(args.cache))) if args.cache else []
    if unknown:
        raise ValueError(f"cache {args.cache!r} has no option(s) {unknown}; it accepts: "
                         f"{', '.join(caches.options_of(args.cache)) or 'none'}")
    sampling.make_sampler(temp=args.temp, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p, seed=args.seed)
    sampling.make_logits_processors(repetition_penalty=args.repetition_penalty,
                                    repetition_context_size=args.repetition_context_size)
    from zoo.runtime.device import parse_dtype

    dtype = None if args.dtype == "stored" else parse_dtype(args.dtype)
    if args.prompt_lookup is not None and args.prompt_lookup < 1:
        raise ValueError(f"--prompt-lookup must be >= 1 (the n-gram size to match), got {args.prompt_lookup}")
    if args.num_draft < 1:
        raise ValueError(f"--num-draft must be >= 1, got {args.num_draft}")
    if args.system is not None and not args.chat:
        raise ValueError("--system needs --chat (it is a chat message)")
    model, tokenizer = loading.load(args.model, dtype=dtype)
    if args.chat:  # the template writes BOS and the turn markers itself
        system = [{"role": "system", "content": args.system}] if args.system is not None else []
        if args.prompts_file is not None:
            prompts = [zoo.apply_chat_template(tokenizer, system + [{"role": "user", "content": p}],
                                               add_generation_prompt=True, tokenize=True) for p in prompts]
        else:
            prompt = zoo.apply_chat_template(tokenizer, system + [{"role": "user", "content": prompt}],
                                             add_generation_prompt=True, tokenize=True)
    draft = loading.load_model(args.draft, dtype=dtype) if args.draft else None
    if args.prompts_file is not None:
        return run_batch(args, model, tokenizer, prompts, cache_options)
    from zoo.speculative import SpeculativeStats

    stats = SpeculativeStats()
    speculation = {} if draft is None and args.prompt_lookup is None else dict(
        draft=draft, prompt_lookup=args.prompt_lookup, num_draft=args.num_draft, speculative_stats=stats)
    responses = zoo.stream_generate(
        model,
        tokenizer,
        prompt,
        max_tokens=args.max_tokens,
        temp=args.temp,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        seed=args.seed,
        repetition_penalty=args.repetition_penalty,
        repetition_context_size=args.repetition_context_size,
        cache=args.cache,
        cache_options=cache_options,
        stop=args.stop or None,
        prefill_step=args.prefill_step,
        add_bos=None if args.chat else (False if args.no_bos else None),
        **speculation,
    )
    last = None
    for last in responses:
        sys.stdout.write(last.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if last is None:
        print("Generation: 0 tokens", file=sys.stderr)
        return 0
    print(f"Prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.3f} tokens-per-sec", file=sys.stderr)
    print(f"Generation: {last.generation_tokens} tokens, {last.generation_tps:.3f} tokens-per-sec",
          file=sys.stderr)
    print(f"Peak memory: {last.peak_memory:.3f} GB", file=sys.stderr)
    if speculation:
        print(f"Speculative: {stats.accepted}/{stats.drafted} drafted tokens accepted "
              f"({100 * stats.acceptance_rate:.0f}%), {stats.rounds} model forwards for "
              f"{stats.emitted} tokens", file=sys.stderr)
    print(f"Finish: {last.finish_reason}", file=sys.stderr)
    return 0


def read_prompts(path: str) -> list[str]:
    """The prompts of a --prompts-file: one per line; a blank line is refused (line number)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as error:
        raise ValueError(f"cannot read --prompts-file {path!r}: {error.strerror or error}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise ValueError(f"--prompts-file {path!r} line {number} is blank: one prompt per line, no blank lines")
    if not lines:
        raise ValueError(f"--prompts-file {path!r} holds no prompts")
    return lines


def run_batch(args: argparse.Namespace, model: Any, tokenizer: Any, prompts: list[str],
              cache_options: dict[str, Any]) -> int:
    """--prompts-file: every reply, one per line in the file's order; statistics to stderr."""
    import zoo

    result = zoo.batch_generate(
        model, tokenizer, prompts, batch_size=args.batch_size, max_tokens=args.max_tokens, temp=args.temp,
        top_p=args.top_p, top_k=args.top_k, min_p=args.min_p, seed=args.seed,
        repetition_penalty=args.repetition_penalty, repetition_context_size=args.repetition_context_size,
        cache=args.cache, cache_options=cache_options, stop=args.stop or None, prefill_step=args.prefill_step,
        add_bos=None if args.chat else (False if args.no_bos else None))
    for text in result.texts:
        sys.stdout.write(text.replace("\\", "\\\\").replace("\n", "\\n") + "\n")
    sys.stdout.flush()
    prompt_tokens = sum(s.prompt_tokens for s in result.stats)
    generated = sum(s.generation_tokens for s in result.stats)
    print(f"Batch: {len(prompts)} prompts, batch size {args.batch_size or len(prompts)}", file=sys.stderr)
    print(f"Prompt: {prompt_tokens} tokens, {result.prompt_tps:.3f} tokens-per-sec", file=sys.stderr)
    print(f"Generation: {generated} tokens, {result.generation_tps:.3f} tokens-per-sec (all rows)", file=sys.stderr)
    print(f"Cache: {result.cache_bytes / 1e6:.3f} MB for the largest batch, "
          f"{result.cache_bytes_per_row / 1e6:.3f} MB per row, padding {100 * result.padding_overhead:.1f}% "
          f"of its slots", file=sys.stderr)
    print(f"Peak memory: {result.peak_memory:.3f} GB", file=sys.stderr)
    for row, stats in enumerate(result.stats):
        print(f"Row {row}: {stats.prompt_tokens} prompt tokens, {stats.generation_tokens} generated, "
              f"finish {stats.finish_reason}", file=sys.stderr)
    return 0
