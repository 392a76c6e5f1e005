"""A CLI run says where it writes and summarises itself; its console lines also land in train.log."""

from __future__ import annotations

import re
import subprocess
import sys

from moe_lm.config import ExpertConfig, LossConfig, ModelConfig
from moe_lm.model import Transformer
from tests.conftest import read_metrics
from tests.training.helpers import train_cli


def cli_output(run, overrides) -> list[str]:
    proc = train_cli(run, overrides)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    return out.splitlines()


def line(lines: list[str], prefix: str) -> str:
    found = [x for x in lines if x.startswith(prefix)]
    assert found, f"no line starting {prefix!r} in:\n" + "\n".join(lines)
    return found[-1]


def test_cli_run_prints_run_dir_summaries_and_grad_norm_and_logs_steps(tmp_path, tiny_overrides):
    run = tmp_path / "run"
    lines = cli_output(run, [*tiny_overrides, "trainer.max_steps=4", "trainer.eval_every=2",
                             "trainer.ckpt_every=4"])
    assert line(lines, "run dir: ").split()[2] == str(run.resolve())
    assert lines[-1] == f"run dir: {run.resolve()}"  # the last line says it again
    # parameter counts against the instantiated model (the tiny config's 100277-token vocab)
    model = Transformer(ModelConfig(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2,
                                    ffn_hidden=128, vocab_size=100277),
                        ExpertConfig(num_experts=4, hidden_size=64), LossConfig())
    total = sum(p.numel() for p in model.parameters())
    model_line = line(lines, "model: ")
    assert f"{total / 1e6:.1f}M parameters" in model_line and "embedding" in model_line
    assert "128 tokens/step" in line(lines, "data: ")  # 4 sequences x 32 tokens
    assert "precision fp32" in line(lines, "device: cpu")
    rows = read_metrics(run)
    train_rows = [r for r in rows if "loss" in r]
    for r in train_rows:  # each step's console line shows the logged gradient norm
        assert f"gnorm {r['grad_norm']:.2f}" in line(lines, f"step {r['step']:>6}/4")
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    done = line(lines, "done: 4/4 steps in ")
    assert f"best {min(vals):.4f}" in done and f"final {vals[-1]:.4f}" in done
    ckpt = re.search(r"checkpoint (\S+)", done).group(1)
    assert ckpt == str(run / "checkpoints" / "step_0000004")
    log = (run / "train.log").read_text()
    for r in train_rows:
        assert f"step {r['step']:>6}/4 | loss {r['loss']:.4f}" in log
    assert "done: 4/4 steps" in log and "run dir: " in log


def test_rerun_of_a_finished_run_says_it_is_complete(tmp_path, tiny_overrides):
    run = tmp_path / "run"
    overrides = [*tiny_overrides, "trainer.max_steps=2", "trainer.eval_every=2"]
    cli_output(run, overrides)
    lines = cli_output(run, overrides)
    assert "already complete at step 2 of 2" in line(lines, "this run is already complete")
    assert len([r for r in read_metrics(run) if "loss" in r]) == 2  # nothing trained again


def test_train_help_describes_the_groups_and_canonical_keys():
    proc = subprocess.run([sys.executable, "-m", "moe_lm.train", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("python -m moe_lm.train [+experiment=NAME]")
    assert re.search(r"^experiment: .*\bquick\b", out, re.M)  # the groups, with their options
    keys = out.split("== Canonical keys", 1)[1].split("== Composed config", 1)[0]
    for key in ("trainer.stop_at", "trainer.precision", "expert.num_experts", "data.path",
                "hydra.run.dir"):
        assert re.search(rf"(^|\s){re.escape(key)}[\s,]", keys, re.M), key
