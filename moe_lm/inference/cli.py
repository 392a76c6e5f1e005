"""What the after-training command-line tools share: clean errors and the common options."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from moe_lm.errors import MoeLMError

# what `--quantize` accepts (moe_lm.compress.weight_only implements each)
QUANTIZE_MODES = ("none", "int8", "int4", "int8-experts")


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Runs a tool's `main`; a MoeLMError becomes one `moe_lm: error: ...` line and exit code 2."""
    try:
        return int(main(argv) or 0)
    except MoeLMError as err:
        print(f"\nmoe_lm: error: {err}", file=sys.stderr, flush=True)
        return 2


def add_model_args(parser: argparse.ArgumentParser, quantize: bool = True) -> None:
    """`path`, `--device`, `--backend` (and `--quantize`): how every tool loads its model."""
    parser.add_argument("path", help="a run directory (its newest checkpoint is used) or a "
                        "checkpoints/step_NNNNNNN directory")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--backend", default=None, choices=["torch", "triton", "megablocks"],
                        help="expert backend (default: the run's on CUDA, torch on CPU)")
    if quantize:
        parser.add_argument("--quantize", default="none", choices=QUANTIZE_MODES,
                            help="weight-only, through torchao: int8 (per channel) or int4 (groups "
                            "of 32) linear layers and experts; int8-experts: moe_lm's own int8 "
                            "experts only")
