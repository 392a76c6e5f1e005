"""Evaluation: `python -m moe_lm.eval <run or checkpoint> [--source S | --data PATH | --tasks T]`.

Reports the mean next-token loss (nats), perplexity and bits per byte, on the run's held-out split
(the batches the training loop evaluated: the loss matches the run's `val_loss`; `--source NAME`:
one source of a data mixture, its `val/NAME/loss`) or on `--data` files (.txt/.md/.jsonl/.parquet,
in windows of `data.seq_len`). Bits per byte divide the total loss by the UTF-8 size of the text,
so models with different tokenizers compare. `--tasks` runs lm-evaluation-harness tasks instead.
"""

from __future__ import annotations

import argparse
import json
import sys

from moe_lm.compress.weight_only import quantize_model
from moe_lm.inference import load_model
from moe_lm.inference.cli import add_model_args, run_cli
from moe_lm.inference.evaluate import evaluate_loaded, format_result, result_row
from moe_lm.inference.task_eval import add_task_args, evaluate_tasks


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m moe_lm.eval", description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--data", default=None, help="files to score instead of the run's val split")
    p.add_argument("--source", default=None, help="the mixture's source whose val split to score")
    p.add_argument("--batches", type=int, default=None,
                   help="val batches to use (default: the run's trainer.eval_batches)")
    p.add_argument("--seq-len", type=int, default=None, help="window length for --data")
    p.add_argument("--batch-size", type=int, default=None,
                   help="windows per batch for --data, requests per forward for --tasks")
    p.add_argument("--max-tokens", type=int, default=None, help="score at most this many tokens")
    p.add_argument("--precision", default=None, choices=["bf16", "fp32"],
                   help="default: the run's trainer.precision")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    add_task_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Loads the model, evaluates it and prints loss, perplexity and bits per byte."""
    args = build_parser().parse_args(argv)
    loaded = load_model(args.path, args.device, args.backend)
    quantize_model(loaded.model, args.quantize)
    if args.tasks:  # lm-eval tasks instead of the loss
        row, table = evaluate_tasks(loaded, args.tasks, args.num_fewshot, args.limit,
                                    args.batch_size, args.include_path, args.precision, args.quantize)
        print(json.dumps(row) if args.json else table)
        return 0
    result = evaluate_loaded(loaded, args.data, args.batches, args.seq_len, args.batch_size,
                             args.precision, args.max_tokens, source=args.source)
    row = result_row(loaded, result, args.data, args.quantize, args.precision, args.source)
    print(json.dumps(row) if args.json else format_result(row))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
