"""One start time for all ranks of a torchrun job: what `${run_start:...}` in `conf/` resolves to.

It sits beside `config.py` at the bottom of the package (the config's resolver needs it and the
config imports nothing above it); it needs only `torch.distributed`'s store, not a process group.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta

import torch.distributed as dist


def agreed_start_time(timeout_s: float = 300.0) -> datetime:
    """One start time for all ranks of a torchrun job (what `${now:...}` resolves to), so that
    every rank resolves the same Hydra run directory. Outside torchrun: this process's time.

    The first rank to ask writes its time into torchrun's agent store; the rest read it. Other
    launchers should pass `hydra.run.dir` explicitly.
    """
    now = datetime.now()
    if (int(os.environ.get("WORLD_SIZE", "1")) <= 1
            or os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true"):
        return now
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          is_master=False, timeout=timedelta(seconds=timeout_s))
    key = f"moe_lm/start_time/{os.environ.get('TORCHELASTIC_RUN_ID', 'none')}"
    agreed = store.compare_set(key, "", now.isoformat()).decode()
    return datetime.fromisoformat(agreed)
