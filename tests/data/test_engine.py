"""`python -m moe_lm.prepare` on datatrove: 1 and 2 workers write the shards the training run
writes in-process, a SIGKILLed prepare continues to the same shards, its peak memory does not grow
with the corpus (30 MB vs 300 MB), bad settings fail clearly."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("datatrove")

from moe_lm.config import PrepareConfig, SourceConfig  # noqa: E402
from moe_lm.data.engine import check_engine, prepare_on_engine  # noqa: E402
from moe_lm.data.prepare import plan_prepare, prepare  # noqa: E402
from moe_lm.errors import ConfigError, DataError  # noqa: E402

from .conftest import DOCS  # noqa: E402
from .test_chunks import MANY, same_shards, write_jsonl  # noqa: E402


def corpus(root: Path) -> Path:
    """Two jsonl files (one gzip) and text files: several chunks at chunk_mb=0.004."""
    write_jsonl(root / "a.jsonl", MANY)
    write_jsonl(root / "b.jsonl.gz", MANY[::-1])
    for i, doc in enumerate(DOCS):
        (root / f"c{i}.txt").write_text(doc * 20)
    return root


@pytest.mark.parametrize("workers", [1, 2])
def test_engine_writes_the_in_run_shards(tmp_path, data_cfg, tok, workers, capfd):
    root = corpus(tmp_path / "d")
    in_run = prepare(data_cfg(root, chunk_mb=0.004, cache_dir=str(tmp_path / "in_run")), tok)
    cfg = data_cfg(root, chunk_mb=0.004, cache_dir=str(tmp_path / f"w{workers}"))
    n_chunks = len(plan_prepare(cfg, tok).chunks)
    assert n_chunks > 4
    engine = prepare_on_engine(cfg, tok, PrepareConfig(workers=workers))
    assert engine.name == in_run.name  # the same cache key: train reads what prepare made
    assert same_shards(engine, in_run)
    bar = capfd.readouterr().err  # the progress bar: bytes, documents/s, tokens/s, ETA
    assert "100%" in bar and "docs/s" in bar and "tokens/s" in bar
    logs = Path(cfg.cache_dir) / "prepare_logs" / engine.name
    assert len(list((logs / "completions").iterdir())) == n_chunks  # one datatrove task each


def run_prepare(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "moe_lm.prepare", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group, to kill it whole


@pytest.mark.slow
def test_sigkilled_prepare_continues_to_the_same_shards(tmp_path, data_cfg, tok):
    root = tmp_path / "d"
    write_jsonl(root / "big.jsonl", MANY * 30)  # ~0.6 MB: 60 chunks of 10 kB
    cfg = data_cfg(root, chunk_mb=0.01, cache_dir=str(tmp_path / "cache"))
    plan = plan_prepare(cfg, tok)
    args = [f"data.path={root}", "data.chunk_mb=0.01", "data.val_fraction=0.25",
            f"data.cache_dir={cfg.cache_dir}", "prepare.workers=1"]
    proc = run_prepare(args)
    records = plan.partial / "chunks"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(records.glob("chunk_*.json"))
                                         if records.is_dir() else []) < 5:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)  # the main process only: children may outlive it
    proc.wait()
    done = {p.name: p.stat().st_mtime_ns for p in records.glob("chunk_*.json")}
    assert not plan.done and 5 <= len(done) < len(plan.chunks)  # killed mid-way, unpublished

    rerun = run_prepare(args)
    try:
        out, _ = rerun.communicate(timeout=300)
    finally:
        for p in (proc, rerun):  # datatrove's manager process of the killed run, if alive
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
    assert rerun.returncode == 0, out
    assert out.strip().splitlines()[-1] == str(plan.final)
    kept = {n: (plan.final / "chunks" / n).stat().st_mtime_ns for n in done}
    assert kept == done  # finished chunks were not redone
    reference = prepare(data_cfg(root, chunk_mb=0.01, cache_dir=str(tmp_path / "ref")), tok)
    assert same_shards(plan.final, reference)


def test_cli_missing_path_is_one_clear_error(tmp_path):
    proc = run_prepare([f"data.path={tmp_path / 'nope'}", f"data.cache_dir={tmp_path}"])
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert out.startswith("moe_lm: error: data.path=") and "does not exist" in out
    assert "Traceback" not in out


def test_cli_mixture_names_the_bad_source(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", MANY)
    sources = (f"data.sources=[{{name: web, path: {good}, weight: 1}},"
               f"{{name: code, path: {good}, weight: 0}}]")
    proc = run_prepare([sources, f"data.cache_dir={tmp_path}"])
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "source 'code' has weight 0" in out, out


def test_bad_engine_settings_say_what_to_change():
    with pytest.raises(ConfigError, match="choose local"):
        check_engine(PrepareConfig(executor="spark"))
    with pytest.raises(ConfigError, match="workers=0 must be >= 1"):
        check_engine(PrepareConfig(workers=0))
    with pytest.raises(ConfigError, match="slurm_partition"):
        check_engine(PrepareConfig(executor="slurm"))


def test_prepare_of_a_mixture_config_is_refused(tmp_path, data_cfg, tok):
    cfg = data_cfg(None)
    cfg.sources = [SourceConfig("web", str(tmp_path), 1.0)]
    with pytest.raises(DataError, match="mixture"):
        prepare(cfg, tok)


# The prepare command in this process, then its peak RSS. VmHWM, not ru_maxrss: Linux carries the
# parent's peak at fork into the child's ru_maxrss. With prepare.workers=1 datatrove runs the
# tasks in this process, so VmHWM covers the reading and tokenizing of every chunk.
RSS_CHILD = r"""
import re, runpy, sys
sys.argv = ["moe_lm.prepare", *sys.argv[1:], "hydra.run.dir=.", "hydra/job_logging=disabled"]
try:
    runpy.run_module("moe_lm.prepare", run_name="__main__")
except SystemExit as e:
    if e.code:
        raise
hwm = re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read()).group(1)
print("VmHWM_MB", int(hwm) // 1024)
"""
# Long English words that cl100k_base keeps whole: ~40 MB of text per CPU-second, several times
# the rate of real text, so the 300 MB corpus costs seconds, not minutes, on CI's 2 cores.
WORDS = (" understanding information development government international performance"
         " environment technology management community relationship experience") * 1000


def write_big_jsonl(path: Path, mb: int) -> int:
    """`mb` megabytes of JSON lines, ~0.9 MB per document (each starts with its number)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w") as f:
        while f.tell() < mb * 1_000_000:
            f.write(json.dumps({"text": f"{n}{WORDS}"}) + "\n")
            n += 1
    return n


@pytest.mark.slow
def test_peak_memory_of_prepare_does_not_grow_with_the_corpus(tmp_path):
    """`python -m moe_lm.prepare` over 30 MB and 300 MB of jsonl (8 MB chunks: 4 and 38 of them)
    in fresh processes: 10x the corpus peaks within 32 MB of the smaller one, and both stay
    under 400 MB plus 8x one chunk (imports and tokenizer, then one chunk's text, token lists
    and arrays at a time)."""
    if not Path("/proc/self/status").is_file():
        pytest.skip("needs Linux's /proc for the peak RSS (VmHWM)")
    peaks, chunk_mb = {}, 8
    for mb in (30, 300):
        root = tmp_path / f"c{mb}"
        write_big_jsonl(root / "docs.jsonl", mb)
        proc = subprocess.run(
            [sys.executable, "-c", RSS_CHILD, f"data.path={root}", f"data.chunk_mb={chunk_mb}",
             f"data.cache_dir={tmp_path / 'cache'}", "prepare.workers=1"],
            capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        peaks[mb] = int(re.search(r"VmHWM_MB (\d+)", proc.stdout).group(1))
        shard_dir = Path(proc.stdout.split("VmHWM_MB")[0].strip().splitlines()[-1])
        meta = json.loads((shard_dir / "meta.json").read_text())
        assert meta["chunks"] >= mb // chunk_mb and meta["documents"]["total"] > mb
        for f in shard_dir.glob("*.bin"):  # disk only: the next corpus needs the room
            f.unlink()
        (root / "docs.jsonl").unlink()
    print("peak RSS MB:", peaks)
    assert peaks[300] <= peaks[30] + 32, peaks
    assert max(peaks.values()) <= 400 + 8 * chunk_mb, peaks


FAKE_SBATCH = r"""#!/bin/bash
# A one-machine stand-in for SLURM's sbatch: runs every task of the array now, in order, then
# prints the job id. Jobs run in submission order, so a dependency has always finished.
script="${@: -1}"; offset=0
for a in "$@"; do case $a in --export=*RUN_OFFSET=*) offset=${a##*RUN_OFFSET=};; esac; done
spec=$(sed -n 's/^#SBATCH --array=\([0-9]*-[0-9]*\).*/\1/p' "$script"); spec=${spec:-0-0}
for i in $(seq "${spec%-*}" "${spec#*-}"); do
  RUN_OFFSET=$offset SLURM_ARRAY_TASK_ID=$i SLURM_JOB_ID=7 SLURM_NODELIST=localhost bash "$script" >> "$FAKE_SLURM_LOG" 2>&1 \
    || { echo "task $i failed" >&2; exit 1; }
done
echo "Submitted batch job 7"
"""
FAKE_SRUN = r"""#!/bin/bash
while [ $# -gt 0 ]; do case $1 in -n|-N) shift 2;; -*) shift;; *) break;; esac; done
exec "$@"
"""
FAKE_SCONTROL = "#!/bin/bash\necho localhost\n"  # `scontrol show hostnames $SLURM_NODELIST`


@pytest.mark.slow
def test_slurm_executor_writes_the_in_run_shards(tmp_path, data_cfg, tok, monkeypatch):
    """SLURM's sbatch / srun / scontrol replaced by scripts that run the job array on this
    machine: the job array and the dependent publish job give the in-process shards."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("srun", FAKE_SRUN),
                       ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_LOG", str(tmp_path / "slurm.log"))
    root = corpus(tmp_path / "d")
    in_run = prepare(data_cfg(root, chunk_mb=0.004, cache_dir=str(tmp_path / "in_run")), tok)
    cfg = data_cfg(root, chunk_mb=0.004, cache_dir=str(tmp_path / "slurm"))
    pcfg = PrepareConfig(executor="slurm", slurm_partition="cpu", tasks=3)
    assert prepare_on_engine(cfg, tok, pcfg) is None  # submitted: the jobs publish it
    plan = plan_prepare(cfg, tok)
    log = (tmp_path / "slurm.log").read_text() if (tmp_path / "slurm.log").exists() else ""
    assert plan.done, log[-3000:]
    assert same_shards(plan.final, in_run)
