"""lm-eval request time: moe_lm's `moe_lm` model against lm-eval's `hf` model, same weights.

    python experiments/bench_lm_eval.py RUN                    # a run directory or checkpoint
    python experiments/bench_lm_eval.py RUN --copies 8 --batch-size 8 --threads 2 --repeat 3

The requests are those of the local test tasks (tests/inference/lm_eval_tasks: multiple choice,
rolling log-likelihood, greedy generation), each copied `--copies` times with a distinct prefix
(identical requests would share one forward). `hf` is lm-eval's HFLM on the directory
`moe_lm.export_hf` writes, with a transformers tokenizer giving moe_lm's ids. Both run in fp32 on
the CPU with the same batch size; repetitions alternate which model goes first. The script prints
the median seconds per request of each request type, the ratio, and the environment, as markdown.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from moe_lm.interop.hf_export import export  # noqa: E402
from moe_lm.inference.lm_eval_model import MoeLM  # noqa: E402
from tests.inference.hf_tokenizer import hf_tokenizer_like  # noqa: E402

TASK_DIR = ROOT / "tests" / "inference" / "lm_eval_tasks"
TASKS = {"loglikelihood": "moe_lm_test_mc", "loglikelihood_rolling": "moe_lm_test_rolling",
         "generate_until": "moe_lm_test_gen"}


def build_requests(copies: int) -> dict:
    """request type -> lm-eval Instances of the local tasks, each copied with a distinct prefix."""
    from lm_eval.tasks import TaskManager

    cwd = os.getcwd()
    os.chdir(TASK_DIR)  # the task YAMLs name their jsonl files relative to the working directory
    try:
        tasks = TaskManager(include_path=str(TASK_DIR)).load(list(TASKS.values()))["tasks"]
    finally:
        os.chdir(cwd)
    out = {}
    for kind, name in TASKS.items():
        task = tasks[name]
        task.build_all_requests(limit=None, rank=0, world_size=1)
        base = list(task.instances)
        out[kind] = []
        for c in range(copies):
            for inst in base:
                args = list(inst.args)
                args[0] = f"Example {c}: {args[0]}"
                out[kind].append(type(inst)(inst.request_type, inst.doc, tuple(args), inst.idx,
                                            inst.metadata))
    return out


def time_call(lm, kind: str, requests: list) -> float:
    start = time.perf_counter()
    getattr(lm, kind)(requests)
    return time.perf_counter() - start


def main() -> None:
    from lm_eval.models.huggingface import HFLM

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", help="a moe_lm run directory or checkpoint")
    p.add_argument("--copies", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    ours = MoeLM(args.run, device="cpu", batch_size=args.batch_size, precision="fp32")
    with tempfile.TemporaryDirectory() as tmp:
        out = export(args.run, Path(tmp) / "hf")
        theirs = HFLM(pretrained=str(out), tokenizer=hf_tokenizer_like(ours.tokenizer),
                      device="cpu", dtype="float32", batch_size=args.batch_size)
        requests = build_requests(args.copies)
        times = {(name, kind): [] for name in ("moe_lm", "hf") for kind in TASKS}
        for rep in range(args.repeat + 1):  # the first round warms up, unrecorded
            order = [("moe_lm", ours), ("hf", theirs)][:: 1 if rep % 2 else -1]
            for kind in TASKS:
                for name, lm in order:
                    seconds = time_call(lm, kind, requests[kind])
                    if rep:
                        times[(name, kind)].append(seconds / len(requests[kind]))
    m = ours.model.cfg
    print(f"## lm-eval request time, moe_lm vs hf ({time.strftime('%Y-%m-%d')})\n")
    print(f"model: {m.n_layers} layers, d_model {m.d_model}, vocab {m.vocab_size}, context "
          f"{ours.max_length}; batch size {args.batch_size}; fp32 CPU; "
          f"{args.repeat} repetitions (median)\n")
    print("| request type | requests | moe_lm ms/request | hf ms/request | hf / moe_lm |")
    print("|---|---:|---:|---:|---:|")
    for kind in TASKS:
        a = statistics.median(times[("moe_lm", kind)]) * 1e3
        b = statistics.median(times[("hf", kind)]) * 1e3
        print(f"| {kind} | {len(requests[kind])} | {a:.2f} | {b:.2f} | {b / a:.2f} |")
    import lm_eval
    import transformers
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads), transformers "
          f"{transformers.__version__}, lm-eval {lm_eval.__version__}; command: "
          f"python {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
