"""Hugging Face export: `python -m moe_lm.export_hf <run dir or checkpoint> <out dir>`.

The work is in moe_lm.interop (export_hf: the directory; hf_build: the family and the model;
hf_weights: the weight layouts, e.g. the rotary row permutation and Mixtral's dense layers as E
identical experts behind a zero router).
"""

from __future__ import annotations

import argparse
import sys

from moe_lm.inference.cli import run_cli
from moe_lm.interop.export_hf import describe, export
from moe_lm.interop.hf_build import export_problems

__all__ = ["export", "export_problems", "main"]


def main(argv: list[str] | None = None) -> int:
    """Exports and says what was written."""
    p = argparse.ArgumentParser(prog="python -m moe_lm.export_hf", description=__doc__.split("\n")[0])
    p.add_argument("path", help="a run directory or a checkpoints/step_NNNNNNN directory")
    p.add_argument("out_dir", help="where to write the transformers model")
    args = p.parse_args(argv)
    print(describe(export(args.path, args.out_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
