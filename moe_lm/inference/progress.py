"""Progress bars with an ETA for the after-training tools (eval, prune, quantize), on stderr.

A bar shows on a terminal; `MOE_LM_PROGRESS=1` forces it (logs, CI), `MOE_LM_PROGRESS=0` turns it
off. The tables the tools print on stdout are unchanged, so `--json` output stays parseable.
"""

from __future__ import annotations

import os
import sys
from typing import Iterable, Iterator, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress_enabled() -> bool | None:
    """True / False when `MOE_LM_PROGRESS` says so; None lets tqdm decide (a terminal: shown)."""
    flag = os.environ.get("MOE_LM_PROGRESS", "").strip()
    return None if flag == "" else flag not in ("0", "false", "no")


def progress(items: Iterable[T], desc: str, total: int | None = None,
             unit: str = "batch") -> Iterator[T]:
    """`items`, with a bar (count, rate, elapsed and ETA when `total` or `len(items)` is known)."""
    enabled = progress_enabled()
    return iter(tqdm(items, desc=desc, total=total, unit=unit, file=sys.stderr,
                     disable=None if enabled is None else not enabled, mininterval=0.5,
                     dynamic_ncols=True, leave=True))
