"""Entry point: `python -m moe_lm.plan [+experiment=NAME] [key=value ...]`.

Composes the same config as `python -m moe_lm.train`, plans the run without allocating it (see
`moe_lm.planning`), prints the table and writes `plan.json` to the run directory.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from moe_lm.config import register_configs, to_train_config
from moe_lm.errors import MoeLMError
from moe_lm.planning import format_plan, make_plan, with_tokenizer_vocab, write_plan
from moe_lm.training.warm_start import warm_start_config

register_configs()


@hydra.main(version_base="1.3", config_path="pkg://moe_lm.conf", config_name="config")
def main(cfg: DictConfig) -> None:
    """Plans one run; writes `<run dir>/plan.json`."""
    try:
        plan = make_plan(with_tokenizer_vocab(warm_start_config(to_train_config(cfg))))
    except MoeLMError as err:
        print(f"moe_lm: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    path = write_plan(plan, Path(HydraConfig.get().runtime.output_dir))
    print(format_plan(plan))
    print(f"\nplan.json: {path}  ({plan['plan_seconds']} s)")


if __name__ == "__main__":
    main()
