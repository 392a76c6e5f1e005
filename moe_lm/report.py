"""`python -m moe_lm.report <multirun dir>`: one table and one plot for a whole sweep.

Reads every job of a Hydra multirun directory (its `status.json`, `metrics.jsonl` and overrides)
and writes into that directory

- `report.md`: a markdown table, one row per job: the overrides that vary across the sweep, its
  status, steps, final validation loss, training tokens/s (median over logged steps), and the
  load imbalance and dropped fraction of its last logged step; also printed to stdout;
- `report.png`: validation loss against step, one line per job.

Jobs that failed, were killed or never started are listed as such: a job's status comes from its
`status.json` (see `moe_lm.launch.job_status`), and the jobs the sweep should have run come from
the sweep's `multirun.yaml` (for Hydra's basic sweeper), so a job without a directory is `missing`.
"""

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
