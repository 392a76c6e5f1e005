"""Benchmark of generation: moe_lm's batched decoding against Hugging Face transformers' `generate`
on the same weights (the Mixtral that `moe_lm.export_hf` writes), plus the quantized and pruned
variants of the model: weight memory, tokens/s and the change in validation perplexity.

    python experiments/bench_generate.py                 # trains the default tiny MoE if needed
    python experiments/bench_generate.py --run RUN_DIR --reps 7 --new-tokens 64
    python experiments/bench_generate.py --quick         # 2 reps, 16 new tokens: a smoke test

Every candidate runs greedy decoding in one process, fp32, the same thread count, on the same
prompts (batch 1: one prompt; batch 8: eight prompts of different lengths, left-padded) for the
same number of new tokens (no early stop). Prefill is the time to the first new token; decode
tokens/s is `B * (N - 1) / (t_N - t_1)`, from the medians of the two timings; end to end is
`B * N / t_N`. The last column is the decode ratio from the process's CPU seconds instead of wall
seconds (1 thread: what the process computed, less inflated by other processes' load; memory
bandwidth and caches are still shared). Repetitions are interleaved (each repetition times every
candidate, in a rotating order) so load from other processes spreads over all of them; ratios
are of medians of one run.
The script also checks that moe_lm's greedy tokens equal transformers' on the fp32 model.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from bench_moe_layer import environment_lines
from moe_lm.compress.prune import expert_usage, prune_model
from moe_lm.compress.quantize import model_bytes
from moe_lm.compress.weight_only import QUANTIZE_MODES, quantize_model
from moe_lm.inference import load_model
from moe_lm.inference.evaluate import evaluate_batches, val_split_batches
from moe_lm.inference.generate import generate_batch, left_pad
from moe_lm.inference.text import token_byte_lengths
from moe_lm.interop.hf_export import export

RESULTS = Path(__file__).parent / "results"
DEFAULT_RUN = Path("~/.cache/moe_lm/bench_generate_run").expanduser()


def ensure_run(run: Path | None, steps: int) -> Path:
    """The run to benchmark: `run`, or the default tiny MoE trained for `steps` steps (once)."""
    if run is not None:
        return run
    if not (DEFAULT_RUN / "checkpoints").is_dir():
        subprocess.run([sys.executable, "-m", "moe_lm.train", f"trainer.max_steps={steps}",
                        "trainer.device=cpu", "trainer.precision=fp32", "logger.wandb.mode=disabled",
                        f"trainer.eval_every={steps}", f"trainer.ckpt_every={steps}",
                        f"hydra.run.dir={DEFAULT_RUN}"], check=True)
    return DEFAULT_RUN


def bench_prompts(loaded, batch: int) -> list[list[int]]:
    """`batch` prompts cut from the validation split, of lengths 64, 60, 56, ... tokens."""
    rows = next(iter(val_split_batches(loaded, 1))).tolist()
    while len(rows) < batch:
        rows += rows
    return [rows[b][:max(8, 64 - 4 * b)] for b in range(batch)]


def ours(model) -> Callable[[list[list[int]], int], list[list[int]]]:
    """moe_lm's batched greedy decoding, no early stop."""
    return lambda prompts, n: generate_batch(model, prompts, n, temperature=0.0, stop_id=None)


def theirs(hf, pad_id: int) -> Callable[[list[list[int]], int], list[list[int]]]:
    """transformers' greedy `generate` with its default (dynamic) KV cache, no early stop."""
    def run(prompts, n):
        ids_BP, pad_B = left_pad(prompts, pad_id, "cpu")
        mask_BP = (torch.arange(ids_BP.shape[1])[None, :] >= pad_B[:, None]).long()
        out = hf.generate(ids_BP, attention_mask=mask_BP, max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=pad_id, eos_token_id=None)
        return out[:, ids_BP.shape[1]:].tolist()
    return run


def timed(fn, prompts, n) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of one call."""
    start, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        fn(prompts, n)
    return time.perf_counter() - start, time.process_time() - cpu


def val_ppl(model, loaded, batches: int) -> float:
    lengths = token_byte_lengths(loaded.tokenizer, loaded.cfg.model.vocab_size)
    return evaluate_batches(model, val_split_batches(loaded, batches), lengths, "fp32").ppl


def build_candidates(loaded, hf, args) -> dict[str, dict]:
    """name -> {fn, bytes, ppl}: the fp32 model, each quantization mode, the pruned model, HF."""
    base = loaded.model
    cands = {"moe_lm fp32": {"model": base}}
    for mode in args.quantize:
        q = copy.deepcopy(base)
        quantize_model(q, mode)
        cands[f"moe_lm {mode}"] = {"model": q}
    if args.prune_keep:
        usage = expert_usage(base, val_split_batches(loaded, args.ppl_batches))
        pruned, _, _ = prune_model(base, loaded.cfg, usage, args.prune_keep)
        cands[f"moe_lm pruned {loaded.cfg.expert.num_experts}->{args.prune_keep}"] = {"model": pruned}
    for c in cands.values():
        c["fn"] = ours(c["model"])
        c["bytes"] = model_bytes(c["model"])["total"]
        c["ppl"] = val_ppl(c["model"], loaded, args.ppl_batches)
    hf_bytes = sum(t.numel() * t.element_size() for t in {**dict(hf.named_parameters()),
                                                          **dict(hf.named_buffers())}.values())
    cands["transformers fp32"] = {"fn": theirs(hf, loaded.tokenizer.eot_id), "bytes": hf_bytes,
                                  "ppl": cands["moe_lm fp32"]["ppl"]}
    return cands


def measure(cands: dict[str, dict], prompts: dict[int, list[list[int]]], n: int, reps: int):
    """Interleaved timings: {(name, batch, new_tokens): [(wall s, CPU s) per repetition]}."""
    times: dict[tuple, list[float]] = {}
    names = list(cands)
    for c in cands.values():  # warm-up: first-call allocations and lazy initialisation
        for p in prompts.values():
            timed(c["fn"], p, 2)
    for rep in range(reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for batch, p in prompts.items():
            for name in order:
                for new in (1, n):
                    times.setdefault((name, batch, new), []).append(timed(cands[name]["fn"], p, new))
        print(f"repetition {rep + 1}/{reps} done", flush=True)
    return times


def table(cands, times, n: int, batches: list[int]) -> tuple[list[str], list[dict]]:
    """Markdown rows and JSON rows: per candidate and batch size, memory, ppl, speed, ratios."""
    med = {k: statistics.median(w for w, _ in v) for k, v in times.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in times.items()}
    ref = "transformers fp32"
    base_ppl = cands["moe_lm fp32"]["ppl"]
    lines = ["| candidate | batch | weights MB | val ppl (change) | prefill ms | decode tok/s | "
             "end-to-end tok/s | decode vs transformers | end-to-end vs transformers | "
             "decode vs transformers, CPU time |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for batch in batches:
        for name, c in cands.items():
            t1, tn = med[(name, batch, 1)], med[(name, batch, n)]
            decode = batch * (n - 1) / max(tn - t1, 1e-9)
            e2e = batch * n / tn
            r1, rn = med[(ref, batch, 1)], med[(ref, batch, n)]
            ref_decode, ref_e2e = batch * (n - 1) / max(rn - r1, 1e-9), batch * n / rn
            # the same ratio from CPU seconds: what other processes' load inflates least
            cpu_ratio = (cpu[(ref, batch, n)] - cpu[(ref, batch, 1)]) / max(
                cpu[(name, batch, n)] - cpu[(name, batch, 1)], 1e-9)
            row = dict(candidate=name, batch=batch, weights_mb=c["bytes"] / 1e6, val_ppl=c["ppl"],
                       ppl_change=c["ppl"] / base_ppl - 1, prefill_ms=1e3 * t1,
                       decode_tok_s=decode, e2e_tok_s=e2e, decode_ratio=decode / ref_decode,
                       e2e_ratio=e2e / ref_e2e, decode_ratio_cpu_time=cpu_ratio,
                       reps=len(times[(name, batch, n)]))
            rows.append(row)
            lines.append(f"| {name} | {batch} | {row['weights_mb']:.1f} | {c['ppl']:.2f} "
                         f"({row['ppl_change']:+.2%}) | {row['prefill_ms']:.1f} | {decode:.1f} | "
                         f"{e2e:.1f} | {row['decode_ratio']:.2f}x | {row['e2e_ratio']:.2f}x | "
                         f"{cpu_ratio:.2f}x |")
    return lines, rows


def torchao_version() -> str:
    try:
        import torchao
    except ImportError:
        return "not installed"
    return torchao.__version__


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", type=Path, default=None, help="run or checkpoint directory "
                   "(default: the default tiny MoE, trained once into ~/.cache/moe_lm)")
    p.add_argument("--train-steps", type=int, default=100)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (decode GEMMs are tiny: "
                   "on a loaded machine more threads wait on each other)")
    p.add_argument("--quantize", nargs="*", default=[m for m in QUANTIZE_MODES if m != "none"])
    p.add_argument("--prune-keep", type=int, default=4, help="experts kept per layer (0: skip)")
    p.add_argument("--ppl-batches", type=int, default=4, help="validation batches for ppl")
    p.add_argument("--quick", action="store_true", help="2 reps, 16 new tokens")
    p.add_argument("--out", type=Path, default=None, help="markdown file (default: results/)")
    args = p.parse_args()
    if args.quick:
        args.reps, args.new_tokens = 2, 16
    torch.set_num_threads(args.threads)
    import transformers  # the reference this benchmark compares against

    run = ensure_run(args.run, args.train_steps)
    hf_dir = Path(run) / "hf_export"
    export(run, hf_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    loaded = load_model(run, device="cpu")
    env = environment_lines(torch.get_num_threads())
    cands = build_candidates(loaded, hf, args)
    prompts = {b: bench_prompts(loaded, b) for b in (1, 8)}
    same = ours(loaded.model)(prompts[8], args.new_tokens) == \
        theirs(hf, loaded.tokenizer.eot_id)(prompts[8], args.new_tokens)
    times = measure(cands, prompts, args.new_tokens, args.reps)
    lines, rows = table(cands, times, args.new_tokens, list(prompts))
    m, e = loaded.cfg.model, loaded.cfg.expert
    model_line = (f"- model: {run} step {loaded.ckpt.step}: {m.n_layers} layers, d_model "
                  f"{m.d_model}, {m.n_heads} heads ({m.n_kv_heads} kv), {e.num_experts} experts "
                  f"top-{e.top_k} of hidden {e.hidden_size}, {m.n_dense_layers} dense layer(s), "
                  f"vocab {m.vocab_size} (tied={m.tie_embeddings}); fp32")
    load = os.getloadavg()[0]
    text = "\n".join([
        f"# Generation benchmark ({datetime.date.today()})", "", *env, model_line,
        f"- greedy, {args.new_tokens} new tokens, prompts of 64 (batch 1) and 64..36 tokens "
        f"(batch 8, left-padded); {args.reps} interleaved repetitions, medians; ppl on "
        f"{args.ppl_batches} validation batches",
        f"- torchao {torchao_version()}",
        f"- moe_lm's greedy tokens equal transformers' (batch 8, fp32): {same}",
        f"- load average at end {load:.2f} (2 cores shared with other jobs: expect noise)", "",
        *lines, ""])
    print(text)
    out = args.out or RESULTS / f"bench_generate_{datetime.date.today()}.md"
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
