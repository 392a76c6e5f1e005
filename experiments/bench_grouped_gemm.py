"""Triton grouped GEMM against `torch._grouped_mm`: forward, dX and dW timed one by one (issue 22).

Legend: T tokens, k top-k, E experts, D model width, F expert hidden width, M = T*k rows.

    python experiments/bench_grouped_gemm.py                       # CUDA only
    python experiments/bench_grouped_gemm.py --shapes mixtral layer --out report.md

Per shape: TFLOP/s of each product for the Triton kernels, `torch._grouped_mm` (its backward
products are `_grouped_mm` calls too: dX over the transposed weights, dW over the transposed rows)
and one dense `torch.mm` of the same FLOPs (the measured peak), the Triton / torch ratios with the
issue's targets, the tile shape `choose_tiles` picked, and whether the compiled kernel uses TMA
(its PTX holds `cp.async.bulk.tensor`).
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import torch

# name: (T, k, E, D, F); "mixtral" and "fine" are bench_kernels' shapes, "layer*" bench_moe_layer's
SHAPES = {
    "mixtral": (8192, 2, 8, 4096, 14336),
    "fine": (8192, 6, 64, 2048, 1408),
    "layer": (16384, 2, 8, 1536, 2048),
    "layer_fine": (16384, 6, 64, 1536, 256),
}
TARGET = {"mixtral": 1.0, "layer": 1.0, "fine": 1.05, "layer_fine": 1.05}


def _offs(T: int, k: int, E: int, device: torch.device) -> torch.Tensor:
    """Cumulative expert ends of uniform random top-k routing (int32)."""
    idx = torch.rand(T, E, device=device).topk(k, dim=-1).indices
    return torch.bincount(idx.reshape(-1), minlength=E).cumsum(0).to(torch.int32)


def _uses_tma(kernel) -> str:
    """'yes'/'no' from the PTX of the kernel's compiled variants; '?' when none is cached."""
    fn = getattr(kernel, "fn", kernel)  # through the autotuner
    ptx = []
    try:  # triton's JIT cache layout (3.x): device -> (kernels by key, ...)
        for cache in getattr(fn, "device_caches", {}).values():
            for compiled in cache[0].values():
                ptx.append(compiled.asm.get("ptx", ""))
    except (AttributeError, IndexError, TypeError):
        return "?"
    if not ptx:
        return "?"
    return "yes" if any("cp.async.bulk.tensor" in p for p in ptx) else "no"


def bench(name: str, dtype: torch.dtype) -> list[str]:
    """Markdown rows for one shape."""
    from triton.testing import do_bench

    from moe_lm import kernels
    from moe_lm.kernels import grouped_gemm

    T, k, E, D, F = SHAPES[name]
    dev = torch.device("cuda")
    offs = _offs(T, k, E, dev)
    M = T * k
    x = torch.randn(M, D, device=dev, dtype=dtype)
    w = torch.randn(E, D, F, device=dev, dtype=dtype) / D**0.5
    dy = torch.randn(M, F, device=dev, dtype=dtype)
    w_dense = w[0].contiguous()
    tflops = lambda ms: 2.0 * M * D * F / (ms * 1e-3) / 1e12  # noqa: E731
    ms = {
        ("triton", "fwd"): do_bench(lambda: kernels.grouped_mm(x, w, offs)),
        ("triton", "dX"): do_bench(lambda: kernels.grouped_mm_dx(dy, w, offs)),
        ("triton", "dW"): do_bench(lambda: kernels.grouped_mm_dw(x, dy, offs)),
        ("torch", "fwd"): do_bench(lambda: torch._grouped_mm(x, w, offs=offs)),
        ("torch", "dX"): do_bench(lambda: torch._grouped_mm(dy, w.transpose(1, 2), offs=offs)),
        ("torch", "dW"): do_bench(lambda: torch._grouped_mm(x.t(), dy, offs=offs)),
        ("dense", "fwd"): do_bench(lambda: x @ w_dense),
        ("dense", "dX"): do_bench(lambda: dy @ w_dense.t()),
        ("dense", "dW"): do_bench(lambda: x.t() @ dy),
    }
    try:  # the kernels before issue 22 (compare_commits.sh) have no schedule module
        from moe_lm.kernels import schedule

        cfg = schedule.choose_tiles(M, E, D, F, dtype)
        tile = (f"tile {cfg.block_m}x{cfg.block_n}x{cfg.block_k} w{cfg.num_warps} "
                f"s{cfg.num_stages}")
    except ImportError:
        tile = "tile: autotuned (no schedule module)"
    tma = (f"TMA fwd {_uses_tma(grouped_gemm._grouped_mm_kernel)} "
           f"dW {_uses_tma(grouped_gemm._grouped_mm_dw_kernel)}")
    rows = [f"| {name} M={M} E={E} D={D} F={F} | {tile} | {tma} | | | |"]
    for prod in ("fwd", "dX", "dW"):
        ratio = ms[("torch", prod)] / ms[("triton", prod)]
        ok = "ok" if ratio >= TARGET[name] else "below"
        rows.append(f"| {name} {prod} | {tflops(ms[('triton', prod)]):.0f} | "
                    f"{tflops(ms[('torch', prod)]):.0f} | {tflops(ms[('dense', prod)]):.0f} | "
                    f"**{ratio:.2f}x** | >= {TARGET[name]} {ok} |")
    return rows


def main(argv: list[str] | None = None) -> None:
    """Parses flags, prints the markdown table (and appends it to --out if given)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--out", type=Path, help="append the markdown report to this file")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_grouped_gemm: needs a CUDA GPU (the interpreter times Python)")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    import triton

    lines = [f"## bench_grouped_gemm ({datetime.date.today()})", "",
             f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; "
             f"triton {triton.__version__}; {args.dtype}", "",
             "| product | triton TFLOP/s | torch._grouped_mm | dense mm | triton/torch | target |",
             "|---|---|---|---|---|---|"]
    for name in args.shapes:
        lines += bench(name, dtype)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with args.out.open("a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
