"""Where a moe_lm training step spends its time: torch.profiler over a few `Trainer.train_step`s.

    python experiments/profile_step.py --quick                      # CPU, small model
    python experiments/profile_step.py --device cuda --layers 12 --d-model 1536 --heads 12 \
        --kv-heads 4 --hidden 2048 --seq-len 2048 --batch 8         # the GPU MFU model

Takes the model flags of bench_train.py. Prints the operators sorted by their own device time
(CUDA kernels on a GPU, CPU time otherwise) and the step's wall time; `--trace` writes a Chrome
trace to open in chrome://tracing or Perfetto.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import moe_lm_config, parse_args  # noqa: E402

from moe_lm.training.loop import Trainer  # noqa: E402


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    trace = None
    if "--trace" in argv:
        i = argv.index("--trace")
        trace, argv = argv[i + 1], argv[:i] + argv[i + 2:]
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    backend = args.backends.split(",")[0]
    trainer = Trainer(moe_lm_config(args, compile=args.compile, backend=backend),
                      Path(tempfile.mkdtemp(prefix="profile_step_")))
    cuda = trainer.device.type == "cuda"
    for _ in range(args.warmup):
        float(trainer.train_step()["loss"])
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=False) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            row = trainer.train_step()
        float(row["loss"])  # waits for the device
        step_s = (time.perf_counter() - start) / args.steps
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=60))
    print(f"wall time per step under the profiler: {step_s * 1e3:.1f} ms "
          f"({args.steps} steps, backend {backend}, device {trainer.device})")
    if trace:
        prof.export_chrome_trace(trace)


if __name__ == "__main__":
    main()
