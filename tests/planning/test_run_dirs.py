"""Plans and dry runs write under outputs/plans/, a refused run leaves no directory behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def train_here(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`python -m moe_lm.train` with the default run directory (relative to `cwd`)."""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", "moe_lm.train", *overrides], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_refused_1t_run_and_bad_value_leave_outputs_untouched(tmp_path):
    kept = tmp_path / "outputs" / "2020-01-01" / "00-00-00" / "metrics.jsonl"  # a real run's
    kept.parent.mkdir(parents=True)
    kept.write_text("{}\n")
    for overrides in (["+experiment=1t_moe"], ["expert.top_k=9"]):
        proc = train_here(tmp_path, *overrides)
        assert proc.returncode == 2 and "moe_lm: error:" in proc.stderr, proc.stderr
        assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "outputs").rglob("*")) == [
            Path("outputs/2020-01-01"), Path("outputs/2020-01-01/00-00-00"),
            kept.relative_to(tmp_path)]


def test_dry_run_goes_to_outputs_plans_and_says_where(tmp_path):
    proc = train_here(tmp_path, "trainer.dry_run=true")
    assert proc.returncode == 0, proc.stderr
    said = Path(next(x for x in proc.stdout.splitlines()
                     if x.startswith("dry_run.json: ")).split(": ", 1)[1])
    assert said.is_file() and said.parent.parent.parent == (tmp_path / "outputs" / "plans")
    assert [p.name for p in (tmp_path / "outputs").iterdir()] == ["plans"]
