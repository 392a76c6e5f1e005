"""Profile of greedy decoding: moe_lm's `generate_batch` and transformers' `generate` on the same
weights (the run `bench_generate.py` benchmarks), operators by self CPU time, with input shapes.

    python experiments/profile_generate.py [--run RUN_DIR] [--batch 1] [--new-tokens 32]

One thread (as the benchmark). Both are warmed up first; each table covers one whole call for
`--new-tokens` tokens (the prompt pass included; its share is the first token's).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench_generate import bench_prompts, ensure_run, ours, theirs, timed
from moe_lm.inference import load_model
from moe_lm.interop.hf_export import export


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", type=Path, default=None)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rows", type=int, default=20, help="operators shown per table")
    args = p.parse_args()
    torch.set_num_threads(1)
    import transformers  # the reference

    run = ensure_run(args.run, 100)
    hf_dir = Path(run) / "hf_export"
    export(run, hf_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    loaded = load_model(run, device="cpu")
    prompts = bench_prompts(loaded, args.batch)
    candidates = {"moe_lm": ours(loaded.model),
                  "transformers": theirs(hf, loaded.tokenizer.eot_id)}
    for name, fn in candidates.items():
        timed(fn, prompts, 2)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            timed(fn, prompts, args.new_tokens)
        print(f"## {name}, batch {args.batch}, {args.new_tokens} new tokens")
        print(prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=40,
            max_shapes_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
