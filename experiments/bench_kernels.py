"""Benchmark of the MoE kernels: grouped GEMM TFLOP/s and gather/scatter GB/s.

Legend: T tokens, k top-k, E experts, D model width, F expert hidden width, M = T*k rows.

    python experiments/bench_kernels.py                 # CUDA: full MoE shapes; CPU: small ones
    python experiments/bench_kernels.py --quick         # small shapes anywhere (seconds)
    python experiments/bench_kernels.py --shapes mixtral fine

On CUDA it prints, per shape, the Triton grouped GEMM (forward; backward = dx + dw) against
`torch._grouped_mm`, a per-expert loop and one dense `torch.mm` of the same FLOPs, and gather /
scatter bandwidth against a device-to-device copy, with the issue's target ratios. On CPU it times
the torch paths only: Triton timings need a GPU (the CPU interpreter measures Python, not kernels).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Shape:
    """One MoE layer: tokens per step (per rank), top-k, experts, model width, expert hidden."""

    name: str
    T: int
    k: int
    E: int
    D: int
    F: int


def _one_t_moe_shape() -> Shape:
    """The 1t_moe layer from conf/experiment/1t_moe.yaml when present, else GLaM-1.2T-like."""
    path = Path(__file__).resolve().parents[1] / "conf" / "experiment" / "1t_moe.yaml"
    try:
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(path)
        return Shape("1t_moe", 8192, int(cfg.expert.top_k), int(cfg.expert.num_experts),
                     int(cfg.model.d_model), int(cfg.expert.hidden_size))
    except Exception:  # file not there yet, or keys named otherwise: GLaM 1.2T layer
        return Shape("1t_moe(glam-like)", 8192, 2, 64, 8192, 32768)


FULL = {
    "mixtral": Shape("mixtral", 8192, 2, 8, 4096, 14336),
    "fine": Shape("fine-grained", 8192, 6, 64, 2048, 1408),
}
QUICK = {
    "mixtral": Shape("mixtral/quick", 256, 2, 8, 256, 512),
    "fine": Shape("fine-grained/quick", 256, 6, 64, 128, 96),
    "1t": Shape("1t_moe/quick", 256, 2, 64, 256, 256),
}


def _timer(device: torch.device, reps: int):
    """Returns time_ms(fn): median milliseconds of fn, with CUDA events/do_bench on a GPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=5, rep=max(reps * 10, 50))

    def time_ms(fn) -> float:
        fn(), fn()  # warm up (lazy init, allocator)
        samples = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return sorted(samples)[len(samples) // 2]

    return time_ms


def _routing(s: Shape, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Uniform random top-k routing: (expert_idx (T, k), order (M,), offs (E,) int32)."""
    from moe_lm.ops import torch_backend

    idx_Tk = torch.rand(s.T, s.E, device=device).topk(s.k, dim=-1).indices
    order_M, counts_E = torch_backend.route(idx_Tk, s.E)
    return idx_Tk, order_M, counts_E.cumsum(0).to(torch.int32)


def bench_gemm(s: Shape, device: torch.device, dtype: torch.dtype, time_ms, use_triton: bool):
    """Rows of (method, fwd TFLOP/s, bwd TFLOP/s) for x (M, D) @ w (E, D, F) grouped by expert."""
    from moe_lm.ops import torch_backend

    _, _, offs_E = _routing(s, device)
    M = s.T * s.k
    x_MD = torch.randn(M, s.D, device=device, dtype=dtype)
    w_EDF = torch.randn(s.E, s.D, s.F, device=device, dtype=dtype) / s.D**0.5
    dy_MF = torch.randn(M, s.F, device=device, dtype=dtype)
    flops = 2.0 * M * s.D * s.F
    tflops = lambda ms, mult: mult * flops / (ms * 1e-3) / 1e12  # noqa: E731
    rows = []

    def autograd_pair(name, fn):
        xg, wg = x_MD.clone().requires_grad_(), w_EDF.clone().requires_grad_()
        fwd = time_ms(lambda: fn(xg, wg))
        y = fn(xg, wg)
        bwd = time_ms(lambda: torch.autograd.grad(y, (xg, wg), dy_MF, retain_graph=True))
        rows.append((name, tflops(fwd, 1), tflops(bwd, 2)))

    if use_triton:
        from moe_lm import kernels

        fwd = time_ms(lambda: kernels.grouped_mm(x_MD, w_EDF, offs_E))
        bwd = time_ms(lambda: (kernels.grouped_mm_dx(dy_MF, w_EDF, offs_E),
                               kernels.grouped_mm_dw(x_MD, dy_MF, offs_E)))
        rows.append(("triton grouped_mm", tflops(fwd, 1), tflops(bwd, 2)))
    if torch_backend._native_grouped_mm_ok(x_MD, w_EDF):
        autograd_pair("torch._grouped_mm", lambda x, w: torch._grouped_mm(x, w, offs=offs_E))
    else:
        rows.append(("torch._grouped_mm", float("nan"), float("nan")))  # unsupported here
    autograd_pair("per-expert loop", lambda x, w: torch_backend.grouped_mm_loop(x, w, offs_E))
    w_DF = w_EDF[0].contiguous()
    fwd = time_ms(lambda: x_MD @ w_DF)
    bwd = time_ms(lambda: (dy_MF @ w_DF.t(), x_MD.t() @ dy_MF))
    rows.append(("dense torch.mm", tflops(fwd, 1), tflops(bwd, 2)))
    return rows


def bench_dispatch(s: Shape, device: torch.device, dtype: torch.dtype, time_ms, use_triton: bool):
    """Rows of (method, GB/s) for gather (T, D) -> (M, D) and scatter (M, D) -> (T, D)."""
    from moe_lm.ops import torch_dropless, torch_backend

    idx_Tk, order_M, _ = _routing(s, device)
    M = s.T * s.k
    x_TD = torch.randn(s.T, s.D, device=device, dtype=dtype)
    y_MD = torch.randn(M, s.D, device=device, dtype=dtype)
    w_Tk = torch.rand(s.T, s.k, device=device, dtype=dtype)
    elt = x_TD.element_size()
    moved = (M + M) * s.D * elt  # gather reads M rows, writes M rows; scatter reads M, writes T<=M
    scatter_moved = (M + s.T) * s.D * elt
    gbs = lambda nbytes, ms: nbytes / (ms * 1e-3) / 1e9  # noqa: E731
    dst = torch.empty_like(y_MD)
    rows = [("d2d copy (M, D)", gbs(2 * M * s.D * elt, time_ms(lambda: dst.copy_(y_MD))))]
    if use_triton:
        from moe_lm import kernels

        rows.append(("triton gather", gbs(moved, time_ms(lambda: kernels.gather(x_TD, order_M,
                                                                               s.k)))))
        rows.append(("triton scatter", gbs(scatter_moved, time_ms(
            lambda: kernels.scatter(y_MD, order_M, w_Tk)))))
    rows.append(("torch backend gather",
                 gbs(moved, time_ms(lambda: torch_backend.gather(x_TD, order_M, s.k)))))
    rows.append(("torch backend scatter",
                 gbs(scatter_moved, time_ms(lambda: torch_backend.scatter(y_MD, order_M, w_Tk)))))
    # the dropless paths the torch backend takes on CPU tensors (on the GPU: for comparison)
    rows.append(("torch dropless gather (index_select)", gbs(moved, time_ms(
        lambda: torch_dropless.GatherPermuted.apply(x_TD, order_M, s.k)))))
    for embedding_bag, how in ((True, "embedding_bag, CPU's"), (False, "index_select + bmm")):
        rows.append((f"torch dropless combine ({how})", gbs(scatter_moved, time_ms(
            lambda: torch_dropless.CombinePermuted.apply(y_MD, order_M, w_Tk, embedding_bag)))))
    if use_triton:
        rows.append(("triton route (ms, not GB/s)", time_ms(lambda: kernels.route(idx_Tk, s.E))))
    rows.append(("torch route (ms, not GB/s)", time_ms(lambda: torch_backend.route(idx_Tk, s.E))))
    return rows


def _ratio(rows, a: str, b: str, col: int) -> float:
    get = {r[0]: r[col] for r in rows}
    return get.get(a, float("nan")) / get.get(b, float("nan"))


def main(argv: list[str] | None = None) -> None:
    """Parses flags, runs the tables, prints markdown (and appends it to --out if given)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["mixtral", "fine", "1t"],
                   choices=["mixtral", "fine", "1t"])
    p.add_argument("--quick", action="store_true", help="small shapes (the default on CPU)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", type=Path, help="append the markdown report to this file")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    use_triton = device.type == "cuda"
    quick = args.quick or device.type == "cpu"
    full = {**FULL, "1t": _one_t_moe_shape()}
    shapes = [(QUICK if quick else full)[n] for n in args.shapes]
    time_ms = _timer(device, args.reps)
    card = torch.cuda.get_device_name() if use_triton else platform.processor() or "cpu"

    import triton

    lines = [f"# bench_kernels ({datetime.date.today()})", "",
             f"device: {card}; torch {torch.__version__}; triton {triton.__version__}; "
             f"dtype {args.dtype}", ""]
    if not use_triton:
        lines += ["Triton timings need a GPU (CUDA): on CPU only the torch paths are timed.", ""]
    for s in shapes:
        lines += [f"## {s.name}: T={s.T} k={s.k} E={s.E} D={s.D} F={s.F}", "",
                  "| grouped GEMM | fwd TFLOP/s | bwd TFLOP/s |", "| --- | ---: | ---: |"]
        gemm = bench_gemm(s, device, dtype, time_ms, use_triton)
        lines += [f"| {n} | {f:.3f} | {b:.3f} |" for n, f, b in gemm]
        lines += ["", "| dispatch | GB/s |", "| --- | ---: |"]
        disp = bench_dispatch(s, device, dtype, time_ms, use_triton)
        lines += [f"| {n} | {v:.3f} |" for n, v in disp]
        if use_triton:
            tg, tm, dn = "triton grouped_mm", "torch._grouped_mm", "dense torch.mm"
            cp = "d2d copy (M, D)"
            lines += ["", "targets: " + ", ".join([
                f"fwd vs _grouped_mm {_ratio(gemm, tg, tm, 1):.2f} (>=0.9)",
                f"bwd vs _grouped_mm {_ratio(gemm, tg, tm, 2):.2f} (>=0.9)",
                f"fwd vs dense {_ratio(gemm, tg, dn, 1):.2f} (>=0.6)",
                f"bwd vs dense {_ratio(gemm, tg, dn, 2):.2f} (>=0.6)",
                f"gather vs copy {_ratio(disp, 'triton gather', cp, 1):.2f} (>=0.7)",
                f"scatter vs copy {_ratio(disp, 'triton scatter', cp, 1):.2f} (>=0.7)"])]
        lines.append("")
    report = "\n".join(lines)
    print(report)
    if args.out:
        with args.out.open("a") as f:
            f.write(report + "\n")


if __name__ == "__main__":
    main()
