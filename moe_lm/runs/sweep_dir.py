"""A Hydra callback that prints where a sweep (`-m`) writes, when it starts and when it ends.

Registered in `conf/config.yaml` (`hydra.callbacks.sweep_dir`); the directory it names is what
`python -m moe_lm.report` takes. Hydra's `${now:}` resolver caches its value, so the printed
directory is the one the launcher created.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


def sweep_dir_line(sweep_dir: str | Path, ended: bool) -> str:
    """`sweep dir: DIR (...)`: what the sweep's console says first and last."""
    where = Path(str(sweep_dir)).resolve()
    if ended:
        return (f"sweep dir: {where}  (one run dir per job; compare them with "
                f"python -m moe_lm.report {where})")
    return f"sweep dir: {where}  (one run dir per job: {where}/<job number>/)"


class PrintSweepDir(Callback):
    """Prints the sweep directory at the start and the end of a multirun."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        print(sweep_dir_line(config.hydra.sweep.dir, ended=False), flush=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        print(sweep_dir_line(config.hydra.sweep.dir, ended=True), flush=True)
