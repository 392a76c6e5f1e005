"""Entry point: `python -m moe_lm.train [+experiment=NAME] [key=value ...]` (and `-m` for sweeps).

Hydra composes and type-checks the config; this module turns it into dataclasses once, writes the
run directory's `.hydra/` (never over a resumed run's), and hands over to the training loop.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from moe_lm.config import register_configs, to_train_config
from moe_lm.errors import MoeLMError
from moe_lm.training import distributed as dist_utils

register_configs()


def write_run_config(run_dir: Path, cfg: DictConfig) -> None:
    """Saves the composed config and overrides to `<run>/.hydra/`; a resumed run keeps its first."""
    if not dist_utils.is_rank0():
        return
    hydra_dir = run_dir / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    overrides = list(HydraConfig.get().overrides.task)
    job_cfg = OmegaConf.create({k: v for k, v in cfg.items() if k != "hydra"})
    if (hydra_dir / "config.yaml").exists():
        n = len(list(hydra_dir.glob("resume_*"))) + 1
        hydra_dir = hydra_dir / f"resume_{n}"
        hydra_dir.mkdir()
    OmegaConf.save(job_cfg, hydra_dir / "config.yaml", resolve=True)
    OmegaConf.save(OmegaConf.create(overrides), hydra_dir / "overrides.yaml")


@hydra.main(version_base="1.3", config_path="pkg://moe_lm.conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Trains one run; returns the final validation loss (what optimising sweepers minimise)."""
    from moe_lm.training.loop import run_training  # after Hydra has parsed the command line

    try:
        train_cfg = to_train_config(cfg)
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        write_run_config(run_dir, cfg)
        result = run_training(train_cfg, run_dir)
    except MoeLMError as err:
        print(f"moe_lm: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    return result.get("val_loss")


if __name__ == "__main__":
    main()
