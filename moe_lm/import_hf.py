"""Hugging Face import: `python -m moe_lm.import_hf HF_DIR OUT_DIR [--tokenizer PATH]`.

Reads a local Mixtral / Qwen3-MoE / OLMoE directory (config.json + safetensors, one file or
shards) and writes a moe_lm run directory at step 0 (see moe_lm.interop.import_hf).
"""

from __future__ import annotations

import argparse
import json
import sys

from moe_lm.inference.cli import run_cli
from moe_lm.interop.import_hf import import_hf


def main(argv: list[str] | None = None) -> int:
    """Imports and says what was written and how to use it."""
    p = argparse.ArgumentParser(prog="python -m moe_lm.import_hf", description=__doc__.split("\n")[0])
    p.add_argument("hf_dir", help="a local Hugging Face model directory")
    p.add_argument("out_dir", help="the new run directory (must not exist, or be empty)")
    p.add_argument("--tokenizer", default=None,
                   help="the tokenizer if HF_DIR has no tokenizer.json (a path or tiktoken name)")
    args = p.parse_args(argv)
    out = import_hf(args.hf_dir, args.out_dir, args.tokenizer)
    note = json.loads((out / "import.json").read_text())
    print(f"imported {note['family']} ({note['bytes'] / 2**20:.1f} MiB of weights) into {out}")
    print(f"  python -m moe_lm.generate {out} --prompt 'Hello'")
    print(f"  python -m moe_lm.train init.from_checkpoint={out} data.path=YOUR_DATA")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
