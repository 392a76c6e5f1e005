"""SIGTERM during training: the loop checkpoints after the current step and exits cleanly."""

from __future__ import annotations

import contextlib
import signal


@contextlib.contextmanager
def sigterm_sets(trainer):
    """While inside, SIGTERM sets `trainer.stop_requested` instead of killing the process."""
    def handler(signum, frame):
        trainer.stop_requested = True

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. some launchers): leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
