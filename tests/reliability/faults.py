"""Runs `python -m moe_lm.train` with a fault injected: `python -m tests.reliability.faults FAULT ARGS`.

FAULT is `enospc_on_save=N` (the N-th checkpoint's DCP file write fails with ENOSPC, as a full
disk makes it), `checkpoint_exception_in_fit` (torch's BaseException-derived CheckpointException
escapes the loop) or `none`. The entry point then runs exactly as from the command line, so the exit
code, stderr and status.json are the real ones.
"""

from __future__ import annotations

import errno
import os
import runpy
import sys
import traceback

import torch.distributed.checkpoint.filesystem as dcp_fs
from torch.distributed.checkpoint.api import CheckpointException

from moe_lm.training import loop


def inject_enospc(on_save: int) -> None:
    """Makes DCP's `_write_item` of the `on_save`-th save (1-based) raise ENOSPC after writing a
    partial file, like a full disk."""
    real = dcp_fs._write_item
    seen_dirs: list[str] = []

    def failing(transforms, stream, data, write_item, storage_key, *args, **kwargs):
        directory = os.path.dirname(getattr(stream, "name", ""))
        if directory not in seen_dirs:
            seen_dirs.append(directory)
        if len(seen_dirs) == on_save:
            stream.write(b"\0" * 4096)  # what a full disk leaves: a partial file
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(transforms, stream, data, write_item, storage_key, *args, **kwargs)

    dcp_fs._write_item = failing


def inject_checkpoint_exception_in_fit() -> None:
    """Makes the training loop raise torch's CheckpointException (a BaseException) as it starts,
    as a DCP call outside moe_lm's own wrappers would."""
    def failing(self, logger):
        raise CheckpointException("injected", {0: (OSError(errno.EIO, "Input/output error"),
                                                   traceback.StackSummary())})

    loop.Trainer.fit = failing


def main() -> None:
    fault, args = sys.argv[1], sys.argv[2:]
    if fault.startswith("enospc_on_save="):
        inject_enospc(int(fault.split("=", 1)[1]))
    elif fault == "checkpoint_exception_in_fit":
        inject_checkpoint_exception_in_fit()
    elif fault != "none":
        raise SystemExit(f"unknown fault {fault!r}")
    sys.argv = ["moe_lm.train", *args]
    runpy.run_module("moe_lm.train", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
