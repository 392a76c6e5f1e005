"""`python -m moe_lm.report <multirun dir>`: one table and one plot for a whole sweep
(`report.md`, `report.png`; what they hold: `moe_lm.reporting.sweep_report`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from moe_lm.errors import MoeLMError
from moe_lm.reporting.sweep_report import REPORT_MD, REPORT_PNG, write_report


def main(argv: Optional[list[str]] = None) -> None:
    """CLI: prints the report and says where it wrote report.md and report.png."""
    parser = argparse.ArgumentParser(prog="python -m moe_lm.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", help="the multirun directory (hydra.sweep.dir)")
    args = parser.parse_args(argv)
    try:
        text, _ = write_report(args.sweep_dir)
    except MoeLMError as err:
        print(f"moe_lm: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    print(text)
    print(f"wrote {Path(args.sweep_dir) / REPORT_MD} and {Path(args.sweep_dir) / REPORT_PNG}")


if __name__ == "__main__":
    main()
