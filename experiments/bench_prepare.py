"""Measures the prepare step: tokens/s and peak RSS in-process (the training run's path) and on
datatrove's local executor with 1 and 2 workers, and datatrove's JsonlReader against moe_lm's own
jsonl reader (read only, no tokenizing).

    python experiments/bench_prepare.py --mb 64 --chunk-mb 8 --repeats 3 --out /tmp/bench_prepare

Needs the `moe_lm[data]` extra, and orjson for datatrove's JsonlReader in the reader comparison
(skipped, with a note, without it).

The corpus is real text: the standard library's .py sources as JSON lines, repeated (in a fixed
order) up to `--mb` megabytes. Every variant runs in a fresh process and prepares into its own
cache directory, so each pays for the whole tokenization; the shards of all variants are compared
byte for byte. `cpu_s` counts this process and the children it waited for (not datatrove's
forkserver pool, whose workers are the forkserver's children), so `tokens_per_cpu_s` is the
per-worker rate only for in_process and workers1. With `--repeats N` the variants run round-robin
N times (in_process, workers1, workers2, in_process, ...), so a change in the machine's load
between rounds hits every variant alike; each row records the 1-minute load average before it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

CHILD = r"""
import json, re, resource, runpy, sys, time
sys.argv = ["moe_lm.prepare"] + json.loads(sys.argv[1])
mode = sys.argv.pop(1)
t0 = time.perf_counter()
if mode == "in_process":
    from moe_lm.config import DataConfig
    from moe_lm.data import get_tokenizer, prepare
    kw = dict(a.split("=", 1) for a in sys.argv[1:])
    cfg = DataConfig(path=kw["data.path"], cache_dir=kw["data.cache_dir"],
                     chunk_mb=float(kw["data.chunk_mb"]))
    out = prepare(cfg, get_tokenizer(cfg.tokenizer))
else:
    sys.argv += ["hydra.run.dir=.", "hydra/job_logging=disabled"]
    try:
        runpy.run_module("moe_lm.prepare", run_name="__main__")
    except SystemExit as e:
        if e.code:
            raise
ru_s, ru_c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
print("RESULT", json.dumps({"seconds": time.perf_counter() - t0,
      "cpu_s": ru_s.ru_utime + ru_s.ru_stime + ru_c.ru_utime + ru_c.ru_stime,
      # VmHWM: this process's own peak (ru_maxrss would carry the parent's peak at fork)
      "rss_mb": int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024}))
"""


def make_corpus(path: Path, mb: float) -> dict:
    """JSON lines of the stdlib's sources, repeated up to `mb` megabytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(errors="replace") for p in sorted(root.glob("*.py"))]
    path.parent.mkdir(parents=True, exist_ok=True)
    size, docs = 0, 0
    with open(path, "w") as f:
        while size < mb * 1e6:
            for t in texts:
                line = json.dumps({"text": t}) + "\n"
                f.write(line)
                size += len(line.encode())
                docs += 1
                if size >= mb * 1e6:
                    break
    return {"bytes": size, "documents": docs}


def run_variant(name: str, args: list[str]) -> dict:
    mode = "in_process" if name == "in_process" else "engine"
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps([mode, *args])],
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    return json.loads(line.split(" ", 1)[1])


def compare_readers(path: Path) -> dict:
    """Documents/s of datatrove's JsonlReader and moe_lm's read_jsonl over the same file."""
    try:
        import orjson  # noqa: F401  (datatrove's JsonlReader needs it)
    except ImportError:
        return {"skipped": "orjson is not installed (pip install orjson)"}
    from datatrove.pipeline.readers import JsonlReader

    from moe_lm.data.corpus import read_jsonl

    t0 = time.perf_counter()
    n_dt = sum(1 for _ in JsonlReader(str(path.parent), glob_pattern=path.name).run())
    t1 = time.perf_counter()
    n_ours = sum(1 for _ in read_jsonl(path))
    t2 = time.perf_counter()
    assert n_dt == n_ours, (n_dt, n_ours)
    return {"documents": n_ours, "datatrove_JsonlReader_s": round(t1 - t0, 2),
            "moe_lm_read_jsonl_s": round(t2 - t1, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=64)
    ap.add_argument("--chunk-mb", type=float, default=8)
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_prepare"))
    ap.add_argument("--variants", default="in_process,workers1,workers2")
    ap.add_argument("--repeats", type=int, default=1, help="rounds over the variants")
    a = ap.parse_args()
    corpus = a.out / "corpus" / "docs.jsonl"
    info = make_corpus(corpus, a.mb)
    print(json.dumps({"corpus": info}), flush=True)
    dirs = {}
    for round_, name in [(r, n) for r in range(a.repeats) for n in a.variants.split(",")]:
        cache = a.out / f"cache_{name}_{round_}"
        load = Path("/proc/loadavg").read_text().split()[0]
        args = [f"data.path={corpus.parent}", f"data.cache_dir={cache}",
                f"data.chunk_mb={a.chunk_mb}"]
        if name.startswith("workers"):
            args.append(f"prepare.workers={name[len('workers'):]}")
        res = run_variant(name, args)
        shard_dir = next((cache / "tokens").glob("cl100k_base-*"))
        meta = json.loads((shard_dir / "meta.json").read_text())
        tokens = meta["train_tokens"] + meta["val_tokens"]
        dirs[f"{name}_{round_}"] = shard_dir
        print(json.dumps({"variant": name, "round": round_, "load_1min_before": float(load),
                          "seconds": round(res["seconds"], 2),
                          "tokens": tokens, "tokens_per_s": round(tokens / res["seconds"]),
                          "docs_per_s": round(meta["documents"]["total"] / res["seconds"]),
                          "MB_per_s": round(info["bytes"] / 1e6 / res["seconds"], 2),
                          "cpu_s": round(res["cpu_s"], 2),
                          "tokens_per_cpu_s": round(tokens / max(res["cpu_s"], 1e-9)),
                          "peak_rss_mb": round(res["rss_mb"]), "chunks": meta["chunks"]}),
              flush=True)
    ref = next(iter(dirs.values()))
    for name, d in dirs.items():
        same = all((d / p.name).read_bytes() == p.read_bytes() for p in ref.glob("*.bin"))
        print(json.dumps({"variant": name, "shards_identical_to_first": same}), flush=True)
    print(json.dumps({"readers": compare_readers(corpus)}), flush=True)


if __name__ == "__main__":
    main()
