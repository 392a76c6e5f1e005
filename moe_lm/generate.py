"""Text generation: `python -m moe_lm.generate <run dir or checkpoint> --prompt "..."`.

Autoregressive sampling with a KV cache (the prompt is processed once, then one token per step),
streamed to standard output as the tokens arrive. `--temperature 0` is greedy; otherwise logits
are divided by the temperature and restricted by `--top-k` and `--top-p` (nucleus) before
sampling. The model runs in eval mode, so every token is routed to its top-k experts with no
capacity dropping. Generation stops at `--max-new-tokens` or the end-of-text token.
"""

from __future__ import annotations

import argparse
import sys

from moe_lm.compress.weight_only import quantize_model
from moe_lm.inference import load_model
from moe_lm.inference.cli import add_model_args, run_cli
from moe_lm.inference.generate import check_sampling, stream_continuation


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m moe_lm.generate", description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = no top-k filter")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = no nucleus filter")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step")
    return p


def main(argv: list[str] | None = None) -> int:
    """Loads the model, streams the continuation of --prompt to stdout."""
    args = build_parser().parse_args(argv)
    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    loaded = load_model(args.path, args.device, args.backend)
    quantize_model(loaded.model, args.quantize)
    stream_continuation(loaded, args.prompt, sys.stdout, args.max_new_tokens, args.temperature,
                        args.top_k, args.top_p, use_cache=not args.no_cache, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
