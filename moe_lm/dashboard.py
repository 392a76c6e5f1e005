"""Dashboards as code: `python -m moe_lm.dashboard [--run-dir RUN] [--entity E] [--project P] [k=v ...]`.

Builds the moe_lm wandb workspace (loss, routing balance, routing per layer, throughput) for the
config the overrides compose, or for a run's own config with `--run-dir`, and validates it offline
(see `moe_lm.reporting.dashboard`). Only `--save` talks to the wandb server.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from moe_lm.errors import MoeLMError
from moe_lm.reporting.dashboard import make_dashboard, save_workspace


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m moe_lm.dashboard",
        description="Builds the moe_lm wandb workspace (loss, routing balance per layer, "
                    "throughput) as code; validates offline, saves with --save.")
    parser.add_argument("--entity", default=None,
                        help="wandb entity (user or team); default logger.wandb.entity; needed "
                             "only by --save")
    parser.add_argument("--project", default=None,
                        help="wandb project; default the config's logger.wandb.project")
    parser.add_argument("--name", default="moe_lm routing", help="workspace name")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="take the config from this run and check the panels against its "
                             "metrics.jsonl")
    parser.add_argument("--out", type=Path, default=None, help="write the view spec as JSON")
    parser.add_argument("--save", action="store_true", help="save to the wandb server")
    parser.add_argument("overrides", nargs="*", help="config overrides, as for moe_lm.train")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The CLI: build, validate, optionally write the spec and save; prints a summary."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        workspace, summary = make_dashboard(args.overrides, args.run_dir, args.entity,
                                            args.project, args.name, args.out, args.save)
        print(summary, flush=True)
        if args.save:
            print(f"saved: {save_workspace(workspace)}", flush=True)
    except MoeLMError as err:
        print(f"moe_lm: error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
