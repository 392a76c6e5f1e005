"""What the checkpoint checksums cost: save and resume-check time with and without them.

`python experiments/bench_checkpoint_checksums.py [--d-model 256] [--repeats 3] [--dir /tmp/x]`
builds the default MoE (or a wider one), takes one optimizer step so AdamW has its state, then
times `save_checkpoint` (DCP write + fsync + xxHash3-128 of every file) against the same save with
hashing skipped, and `verify_content` (the resume / tool check) against `load_checkpoint`.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from moe_lm.config import ExpertConfig, LossConfig, ModelConfig, OptimConfig
from moe_lm.model import Transformer
from moe_lm.training import checksums
from moe_lm.training.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint, verify_content
from moe_lm.training.optim import build_optimizer


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = p.parse_args()
    model = Transformer(ModelConfig(d_model=args.d_model, vocab_size=100_277), ExpertConfig(),
                        LossConfig())
    model.init_weights()
    opt = build_optimizer(model, OptimConfig())
    model(torch.randint(0, 1000, (2, 16)), torch.randint(0, 1000, (2, 16))).lm_loss.backward()
    opt.step()
    root = Path(args.dir or tempfile.mkdtemp())
    step = iter(range(1, 10_000))

    def save(run):
        save_checkpoint(run, next(step), model, opt, {"step": 0}, {}, keep_last=1)

    real = checksums.digests

    def save_unhashed():
        checksums.digests = lambda directory, names: {n: "" for n in names}
        try:
            save(root / "without")
        finally:
            checksums.digests = real

    save(root / "warmup")  # first-call costs (DCP planner, allocator) outside the timings
    pairs = [(timed(lambda: save(root / "with"), 1), timed(save_unhashed, 1))
             for _ in range(args.repeats)]  # interleaved: the machine's load hits both alike
    with_sums = statistics.median(a for a, _ in pairs)
    without = statistics.median(b for _, b in pairs)
    ckpt = list_checkpoints(root / "with")[0]
    size = sum(e["size"] for e in ckpt.meta["files"].values())
    verify = timed(lambda: verify_content(ckpt), args.repeats)
    load = timed(lambda: load_checkpoint(ckpt, model, opt), args.repeats)
    print(f"checkpoint {size / 2**20:.1f} MiB ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M"
          f" params + AdamW state), median of {args.repeats}, torch {torch.__version__}")
    print(f"save: {with_sums:.3f} s with checksums, {without:.3f} s without "
          f"(+{with_sums - without:.3f} s, +{100 * (with_sums - without) / without:.0f}%)")
    print(f"resume check: verify {verify:.3f} s ({size / 2**30 / verify:.2f} GiB/s) + load "
          f"{load:.3f} s (+{100 * verify / load:.0f}% on the load)")
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
