"""A stand-in SLURM for tests: `sbatch`, `srun` and `sacct` executables that run jobs locally.

`sbatch` keeps a copy of the submission script, answers `Submitted batch job 4242`, and starts
each array task in the background with the environment SLURM would give one task on one node
(SLURM_JOB_ID, SLURM_ARRAY_*, SLURM_NNODES=1, SLURM_NODEID=0, SLURM_JOB_NODELIST=localhost, ...),
once submitit has put the task's pickle in place. `srun` drops its options and runs the command.
`sacct` reports each finished task as COMPLETED or FAILED.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

JOB_ID = "4242"

SBATCH = r'''
import os, re, subprocess, sys
from pathlib import Path
state = Path(os.environ["FAKE_SLURM_DIR"])
script = Path(sys.argv[-1]).read_text()
(state / "submitted.sh").write_text(script)
array = re.search(r"#SBATCH --array=(\d+)-(\d+)", script)
tasks = [str(t) for t in range(int(array.group(1)), int(array.group(2)) + 1)] if array else [""]
runner = f"""
import glob, os, subprocess, sys, time
task = sys.argv[1]
job = f"{JOB_ID}_{{task}}" if task else "{JOB_ID}"
env = dict(os.environ, SLURM_JOB_ID=str(5000 + int(task or 0)), SLURM_NNODES="1",
           SLURM_JOB_NUM_NODES="1", SLURM_NTASKS="1", SLURM_NODEID="0", SLURM_PROCID="0",
           SLURM_LOCALID="0", SLURM_JOB_NODELIST="localhost")
if task:
    env.update(SLURM_ARRAY_JOB_ID="{JOB_ID}", SLURM_ARRAY_TASK_ID=task)
else:
    env["SLURM_JOB_ID"] = "{JOB_ID}"
pickle = os.path.join(os.environ["FAKE_SLURM_SWEEP"], ".submitit", "**", job + "_submitted.pkl")
deadline, code = time.time() + 60, 1
while time.time() < deadline and not glob.glob(pickle, recursive=True):
    time.sleep(0.2)
if glob.glob(pickle, recursive=True):
    with open(os.path.join(os.environ["FAKE_SLURM_DIR"], f"task{{task or 0}}.log"), "w") as log:
        code = subprocess.call(["bash", sys.argv[2]], env=env, stdout=log,
                               stderr=subprocess.STDOUT)
with open(os.path.join(os.environ["FAKE_SLURM_DIR"], job + ".state"), "w") as f:
    f.write("COMPLETED" if code == 0 else "FAILED")
"""
for task in tasks:
    subprocess.Popen([sys.executable, "-c", runner, task, sys.argv[-1]], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(f"Submitted batch job {JOB_ID}")
'''.replace("{JOB_ID}", JOB_ID)

SRUN = r'''
import os, sys
args = sys.argv[1:]
while args and args[0].startswith("-"):
    option = args.pop(0)
    if option in ("--output", "--error", "-o", "-e") and "=" not in option:
        args.pop(0)
os.execvp(args[0], args)
'''

SACCT = r'''
import glob, os
print("JobID|State|NodeList")
for path in sorted(glob.glob(os.path.join(os.environ["FAKE_SLURM_DIR"], "*.state"))):
    job = os.path.basename(path)[: -len(".state")]
    print(f"{job}|{open(path).read().strip()}|localhost")
'''


def install(bin_dir: Path) -> dict[str, str]:
    """Writes the fake executables into `bin_dir`; returns the PATH that puts them first."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, body in (("sbatch", SBATCH), ("srun", SRUN), ("sacct", SACCT)):
        path = bin_dir / name
        path.write_text(f"#!{sys.executable}\n{body}")
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
