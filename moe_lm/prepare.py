"""Entry point: `python -m moe_lm.prepare [data.path=...] [prepare.workers=N] [prepare.executor=...]`.

Tokenizes `data.path` (or every source of `data.sources`) into the prepared directory that
`python -m moe_lm.train` with the same data settings reads, on datatrove's local or SLURM executor
(see `moe_lm.data.engine`). It takes the same config as training; only `data.*` and `prepare.*`
matter. A killed prepare continues where it stopped when run again.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from moe_lm.config import register_configs, to_train_config
from moe_lm.data.engine import prepare_command
from moe_lm.errors import MoeLMError

register_configs()
# No run directory and no log file: this command writes only into data.cache_dir.
HYDRA_DEFAULTS = ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=disabled"]


@hydra.main(version_base="1.3", config_path="pkg://moe_lm.conf", config_name="config")
def main(cfg: DictConfig) -> None:
    """Prepares the data; prints each prepared directory."""
    try:
        train_cfg = to_train_config(cfg)
        dirs = prepare_command(train_cfg.data, train_cfg.prepare)
    except MoeLMError as err:
        print(f"moe_lm: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    for name, path in dirs.items():
        label = f"{name}: " if name else ""
        print(f"{label}{path if path is not None else 'submitted to SLURM'}", flush=True)


if __name__ == "__main__":
    given = {a.split("=")[0] for a in sys.argv[1:]}
    sys.argv += [a for a in HYDRA_DEFAULTS if a.split("=")[0] not in given]
    main()
