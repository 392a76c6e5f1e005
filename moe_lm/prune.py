"""Expert pruning: `python -m moe_lm.prune <run dir or checkpoint> --keep K [--out DIR]`.

Each MoE layer keeps its K most used experts (usage measured on the run's validation batches) and
the router the matching gate rows; the smaller model is written as a new run directory that eval,
generate, quantize and export_hf load like any other (see `moe_lm.compress.prune`). The command
prints the validation perplexity before and after: what pruning cost.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moe_lm.compress.prune import check_keep, default_out_dir, format_row, prune_run
from moe_lm.inference import load_model
from moe_lm.inference.cli import add_model_args, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m moe_lm.prune", description=__doc__.split("\n")[0])
    add_model_args(p, quantize=False)
    p.add_argument("--keep", type=int, required=True, help="experts to keep in each MoE layer")
    p.add_argument("--out", default=None, help="new run directory (default: <run>_keepK)")
    p.add_argument("--batches", type=int, default=None,
                   help="validation batches for usage and perplexity (default: eval_batches)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


def main(argv: list[str] | None = None) -> int:
    """Measures usage, prunes, saves, and prints the perplexity it cost."""
    args = build_parser().parse_args(argv)
    loaded = load_model(args.path, args.device, args.backend)
    check_keep(loaded, args.keep)
    out_dir = Path(args.out) if args.out else default_out_dir(loaded, args.keep)
    row = prune_run(loaded, args.keep, out_dir, args.batches)
    print(json.dumps(row) if args.json else format_row(row))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
