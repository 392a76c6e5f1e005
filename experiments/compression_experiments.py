"""Distillation and cross-layer sharing, measured end to end through the real CLI (issue 20).

1. Distillation: a larger moe_lm teacher is trained, then a small student with `loss=distill`
   from it and the same student alone (same steps, data, seeds); both validation losses.
2. `model.share_layers` against the unshared model: at equal parameters (same distinct blocks,
   twice the applied depth) and at equal compute (same applied depth and width, half the blocks).

Every run is `python -m moe_lm.train ...` on the default data (the built-in corpus, CPython's
documentation and sources) with one change: a 4,096-token byte-level BPE tokenizer trained on that
corpus with Hugging Face `tokenizers` (`data.tokenizer=<dir>`), not cl100k. With cl100k's 100k-row
embedding 98% of a tiny model's weights and nearly all of its CPU time would be the embedding
and LM head: the blocks that sharing and distillation act on would be noise, and a run would take
an hour on 2 shared cores. The final `val_loss` is read from each run's metrics.jsonl:

    python experiments/compression_experiments.py --out-dir /tmp/compression \
        --report experiments/results/compression_2026-12-02.md

A run whose metrics already hold its last evaluation is not run again (rerun = print the table).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

# every run: 8 sequences of 64 tokens a step, the same 16 x 8 x 64 validation tokens
TOKENIZER: Path = Path()  # set by main: <out-dir>/tokenizer_bpe4k
COMMON = ["data.seq_len=64", "data.batch_size=8", "trainer.eval_batches=16",
          "trainer.precision=fp32", "trainer.device=cpu", "trainer.log_every=20",
          "trainer.keep_last=1", "optim.warmup_steps=20", "logger.wandb.mode=disabled"]
TEACHER = ["model.n_layers=4", "model.d_model=128", "model.n_heads=4", "model.n_kv_heads=2",
           "model.ffn_hidden=384", "expert.num_experts=4", "expert.hidden_size=256"]
STUDENT = ["model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2",
           "model.ffn_hidden=192", "expert.num_experts=4", "expert.hidden_size=128"]
# sharing: all layers MoE (a shared group cannot mix dense and MoE layers)
SHARE_BASE = [o for o in STUDENT if not o.startswith("model.n_layers")] + ["model.n_dense_layers=0"]
SHARING = {
    "unshared, 2 layers": ["model.n_layers=2", "model.share_layers=1"],
    "shared 2x, 4 applied (equal params)": ["model.n_layers=4", "model.share_layers=2"],
    "shared 2x, 2 applied (equal compute)": ["model.n_layers=2", "model.share_layers=2"],
}
EXTRA_SHARING = {  # --with-unshared-4: the unshared model at the equal-params run's compute
    "unshared, 4 layers (compute of equal-params)": ["model.n_layers=4", "model.share_layers=1"],
}


def make_tokenizer(path: Path, vocab: int = 4096) -> Path:
    """A byte-level BPE tokenizer trained on the built-in corpus (tokenizer.json + config)."""
    if (path / "tokenizer.json").is_file():
        return path
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415

    from moe_lm.data.corpus import builtin_source  # noqa: PLC0415

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(builtin_source(6.0).documents(), trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>",
                                                            "bos_token": None}))
    return path


def train(run_dir: Path, overrides: list[str], steps: int, log) -> dict:
    """Runs (or finds finished) one training run; returns its final val_loss and wall time."""
    args = [*COMMON, f"data.tokenizer={TOKENIZER}", f"trainer.max_steps={steps}",
            f"trainer.eval_every={steps}",
            f"trainer.ckpt_every={steps}", *overrides]
    cmd = [sys.executable, "-m", "moe_lm.train", f"hydra.run.dir={run_dir}", *args]
    result = _final(run_dir, steps)
    if result is None:
        log(f"$ {' '.join(cmd[1:])}")
        # one thread per run unless told otherwise: on cores shared with other jobs two
        # threads per process mostly wait on each other
        env = {"OMP_NUM_THREADS": "1", **os.environ, "WANDB_MODE": "disabled"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"{run_dir} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        result = _final(run_dir, steps)
    params = _params(run_dir)
    return {"val_loss": result, "wall_s": _wall(run_dir), "params": params, "command": "python -m moe_lm.train " + " ".join(args)}


def evaluate(run_dir: Path, log) -> dict:
    """`python -m moe_lm.eval` of an existing run on the students' validation tokens."""
    cmd = [sys.executable, "-m", "moe_lm.eval", str(run_dir), "--batches", "16", "--precision",
           "fp32", "--device", "cpu", "--json"]  # the run's val split, its 8 x 64 batches
    log(f"$ {' '.join(cmd[1:])}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"eval of {run_dir} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    return {"val_loss": result["loss"], "wall_s": "-", "params": _params(run_dir),
            "command": " ".join(cmd[1:]).replace("-m moe_lm.eval", "python -m moe_lm.eval")}


def _final(run_dir: Path, steps: int) -> float | None:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    final = [r["val_loss"] for r in rows if "val_loss" in r and r["step"] == steps]
    return final[-1] if final else None


def _wall(run_dir: Path) -> str:
    """The training time the run's own summary gives ('done: N/N steps in 1m46s | ...')."""
    log = run_dir / "train.log"
    done = [line for line in log.read_text().splitlines() if "done:" in line] if log.exists() else []
    return done[-1].split(" in ", 1)[1].split(" |")[0] if done else "?"


def _params(run_dir: Path) -> str:
    """The start summary's parameter line (train.log), e.g. '6.6M parameters, ...'."""
    log = run_dir / "train.log"
    for line in log.read_text().splitlines() if log.exists() else []:
        if "] model: " in line:
            return line.split("] model: ", 1)[1].split(";")[0].strip()
    return "?"


def machine() -> list[str]:
    import torch  # noqa: PLC0415 (the experiment script only)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
                .splitlines() if line.startswith("model name")), platform.processor())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    return [f"- machine: {cpu}, {os.cpu_count()} cores (shared with other jobs)",
            f"- versions: python {platform.python_version()}, torch {torch.__version__}, "
            f"moe_lm commit {commit}",
            f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", type=Path, default=Path("outputs/compression"))
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--teacher", type=Path, default=None,
                    help="an existing teacher run (same tokenizer) instead of training one; its "
                         "val_loss is measured with python -m moe_lm.eval on the same tokens")
    ap.add_argument("--part", choices=["all", "distill", "share"], default="all",
                    help="run one experiment only (e.g. the two at once, in two processes)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--share-seeds", type=int, nargs="+", default=[1])
    ap.add_argument("--with-unshared-4", action="store_true",
                    help="also the unshared 4-layer model (the equal-params run's compute)")
    ap.add_argument("--report", type=Path, default=None, help="also write the table here")
    args = ap.parse_args()
    lines: list[str] = []

    def log(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    load0 = Path("/proc/loadavg").read_text().split()[:3]
    out, S = args.out_dir.resolve(), args.steps
    global TOKENIZER
    TOKENIZER = make_tokenizer(out / "tokenizer_bpe4k")
    prep = subprocess.run([sys.executable, "-m", "moe_lm.prepare", f"data.tokenizer={TOKENIZER}"],
                          capture_output=True, text=True)  # once, before runs read it in parallel
    if prep.returncode != 0:
        raise SystemExit(f"prepare failed:\n{prep.stdout[-2000:]}\n{prep.stderr[-2000:]}")
    teacher = (args.teacher or out / "teacher").resolve()
    rows: list = []
    if args.part != "share" and args.teacher is None:
        t = train(teacher, [*TEACHER, "trainer.seed=1234"], S, log)
        rows = [("teacher (4 layers, d_model 128)", "-", t)]
    elif args.part != "share":
        rows = [("teacher (4 layers, d_model 128), given", "-", evaluate(teacher, log))]

    def distill_pair(seed: int) -> list:
        alone = train(out / f"student_alone_s{seed}", [*STUDENT, f"trainer.seed={seed}"], S, log)
        distill = train(out / f"student_distill_s{seed}",
                        [*STUDENT, f"trainer.seed={seed}", "loss=distill",
                         f"loss.distill_teacher={teacher}"], S, log)
        return [("student alone (2 layers, d_model 64)", seed, alone),
                ("student + loss=distill from the teacher", seed, distill)]

    # first seed of distillation, then sharing, then the other seeds: the first results come early
    for seed in args.seeds[:1] if args.part != "share" else []:
        rows += distill_pair(seed)
    share_rows = []
    sharing = {**SHARING, **(EXTRA_SHARING if args.with_unshared_4 else {})}
    for seed in args.share_seeds if args.part != "distill" else []:
        for name, extra in sharing.items():
            tag = name.split(" (")[0].replace(", ", "_").replace(" ", "_")
            share_rows.append((name, seed, train(out / f"share_{tag}_s{seed}",
                                                 [*SHARE_BASE, *extra, f"trainer.seed={seed}"],
                                                 S, log)))
    for seed in args.seeds[1:] if args.part != "share" else []:
        rows += distill_pair(seed)
    load1 = Path("/proc/loadavg").read_text().split()[:3]
    report = ["# Distillation and cross-layer sharing (issue 20)", "",
              *machine(), f"- load average (1/5/15 min) at start {' '.join(load0)}, "
              f"at end {' '.join(load1)}",
              f"- command: `python experiments/compression_experiments.py --part {args.part} "
              f"{f'--teacher {args.teacher} ' if args.teacher else ''}"
              f"--steps {S} --seeds "
              f"{' '.join(map(str, args.seeds))} --share-seeds "
              f"{' '.join(map(str, args.share_seeds))}"
              f"{' --with-unshared-4' if args.with_unshared_4 else ''}`",
              f"- common settings: {' '.join(COMMON)}, {S} steps of 8 x 64 "
              "tokens, data.tokenizer = a 4,096-token BPE trained on the built-in corpus "
              "(see the script), final val_loss at the last step on the same 16 x 8 x 64 "
              "validation tokens for every run", ""]
    for title, table in (("Distillation", rows), ("Cross-layer sharing", share_rows)):
        if not table:
            continue
        report += [f"## {title}", "", "| run | seed | parameters | final val_loss | training time |",
                   "|---|---|---|---|---|"]
        report += [f"| {name} | {seed} | {r['params']} | {r['val_loss']:.4f} | {r['wall_s']} |"
                   for name, seed, r in table]
        report.append("")
    report += ["## Commands", ""] + [f"- {name} (seed {seed}): `{r['command']}`"
                                     for name, seed, r in rows + share_rows]
    text = "\n".join(report) + "\n"
    print(text)
    if args.report:
        args.report.write_text(text)


if __name__ == "__main__":
    main()
