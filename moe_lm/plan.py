"""Entry point: `python -m moe_lm.plan [+experiment=NAME] [key=value ...]`.

Composes the same config as `python -m moe_lm.train`, plans the run without allocating it (see
`moe_lm.planning`), prints the table and writes `plan.json` to the run directory.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from moe_lm.config import register_configs, to_train_config
from moe_lm.errors import MoeLMError
from moe_lm.training.warm_start import warm_start_config

register_configs()


@hydra.main(version_base="1.3", config_path="pkg://moe_lm.conf", config_name="config")
def main(cfg: DictConfig) -> None:
    """Plans one run; writes `<run dir>/plan.json`."""
    from moe_lm.data import get_tokenizer
    from moe_lm.planning import format_plan, make_plan
    from moe_lm.planning.counting import with_vocab

    try:
        train_cfg = warm_start_config(to_train_config(cfg))  # init.from_checkpoint: its model
        if train_cfg.model.vocab_size <= 0:
            train_cfg = with_vocab(train_cfg, get_tokenizer(train_cfg.data.tokenizer).n_vocab)
        plan = make_plan(train_cfg)
    except MoeLMError as err:
        print(f"moe_lm: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "plan.json").write_text(json.dumps(plan, indent=2) + "\n")
    print(format_plan(plan))
    print(f"\nplan.json: {run_dir / 'plan.json'}  ({plan['plan_seconds']} s)")


if __name__ == "__main__":
    main()
