"""Two runs in one directory: the second is refused at once; a dead holder's lock does not block."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

from moe_lm.errors import RunLockedError
from moe_lm.training.run_lock import RunLock
from tests.conftest import read_metrics
from tests.training.helpers import train_cli

HOLD = ("import sys, time; from moe_lm.training.run_lock import RunLock; "
        "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(600)")


def _holder(run_dir):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_run_in_a_held_directory_is_refused_naming_the_holder(tmp_path, tiny_overrides):
    run = tmp_path / "run"
    holder = _holder(run)
    try:
        (run / "status.json").write_text('{"status": "running", "marker": 1}\n')
        proc = train_cli(run, [*tiny_overrides, "trainer.max_steps=2"])
        out, _ = proc.communicate(timeout=240)
        assert proc.returncode == 2, out
        assert "moe_lm: error:" in out and "in use by another run" in out and "Traceback" not in out
        assert f"pid {holder.pid} on host {socket.gethostname()}" in out
        # the refused run wrote nothing of its own: the holder's status stays; no metrics, no
        # config, no checkpoint (train.log is Hydra's log, opened before moe_lm starts)
        assert json.loads((run / "status.json").read_text()) == {"status": "running", "marker": 1}
        assert sorted(p.name for p in run.iterdir()) == [".lock", "status.json", "train.log"]
    finally:
        holder.kill()
        holder.wait()


def test_lock_of_a_killed_process_does_not_block(tmp_path, tiny_overrides):
    run = tmp_path / "run"
    holder = _holder(run)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert json.loads((run / ".lock").read_text())["pid"] == holder.pid  # the stale file remains
    proc = train_cli(run, [*tiny_overrides, "trainer.max_steps=2", "trainer.eval_every=2"])
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out
    assert max(r["step"] for r in read_metrics(run)) == 2


def test_lock_is_exclusive_between_processes_and_released_after_the_run(tmp_path):
    run = tmp_path / "run"
    holder = _holder(run)
    try:
        lock = RunLock(run)
        try:
            lock.acquire()
            raise AssertionError("a second lock was granted")
        except RunLockedError as err:
            assert f"pid {holder.pid}" in str(err)
    finally:
        holder.kill()
        holder.wait()
    deadline = time.time() + 10
    lock = RunLock(run)
    while True:  # the kernel drops a dead process's flock at once; allow for process teardown
        try:
            lock.acquire()
            break
        except RunLockedError:
            assert time.time() < deadline
            time.sleep(0.1)
    assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
