"""Int8 weight-only expert quantization: `python -m moe_lm.quantize <run dir or checkpoint>`.

Each expert matrix is stored as int8 with one fp32 scale per output channel and dequantized just
before the grouped GEMM (see `moe_lm.compress.quantize`). The command reports the memory saved and
the change in validation perplexity; `eval` and `generate` take `--quantize int8` to run a
quantized model.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from moe_lm.compress.quantize import format_report, quantization_report
from moe_lm.inference import load_model
from moe_lm.inference.cli import add_model_args, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m moe_lm.quantize", description=__doc__.split("\n")[0])
    add_model_args(p, quantize=False)
    p.add_argument("--batches", type=int, default=None,
                   help="validation batches (default: the run's trainer.eval_batches)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


def main(argv: list[str] | None = None) -> int:
    """Evaluates the model in full precision and with int8 experts; prints memory and quality."""
    args = build_parser().parse_args(argv)
    loaded = load_model(args.path, args.device, args.backend)
    report = quantization_report(loaded, args.batches)
    print(json.dumps(asdict(report)) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
