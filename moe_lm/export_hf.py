"""Hugging Face export: `python -m moe_lm.export_hf <run dir or checkpoint> <out dir>`.

Writes a directory that `transformers.AutoModelForCausalLM.from_pretrained` loads as Mixtral,
Qwen3-MoE or OLMoE with the same logits, in fp32; settings none of them can express (shared
experts, sigmoid or expert-choice routers, a router score bias) are refused, naming the setting.
What is rewritten and why: `moe_lm.interop.hf_build` and `moe_lm.interop.hf_weights`.
"""

from __future__ import annotations

import argparse
import sys

from moe_lm.inference.cli import run_cli
from moe_lm.interop.hf_export import export, export_summary


def main(argv: list[str] | None = None) -> int:
    """Exports and says what was written."""
    p = argparse.ArgumentParser(prog="python -m moe_lm.export_hf", description=__doc__.split("\n")[0])
    p.add_argument("path", help="a run directory or a checkpoints/step_NNNNNNN directory")
    p.add_argument("out_dir", help="where to write the transformers model")
    args = p.parse_args(argv)
    print(export_summary(export(args.path, args.out_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
