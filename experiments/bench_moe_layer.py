"""Benchmark of one MoE layer's forward+backward: moe_lm against a dense SwiGLU of the same FLOPs
and against the Mixtral sparse block of Hugging Face `transformers` (`eager` and `grouped_mm`).

Legend: T tokens, k top-k, E experts, D model width, F expert hidden width.

    python experiments/bench_moe_layer.py                       # T=4096, E=8, k=2, D=512, F=1024
    python experiments/bench_moe_layer.py --quick               # small shapes, a few seconds
    python experiments/bench_moe_layer.py --threads 1 --reps 15 --markdown experiments/results/x.md

All candidates compute the same function on the same input with the same weights (the script
checks that their outputs agree) in the same dtype and thread count. The dense reference is a
SwiGLU of hidden width k*F over the T tokens: the experts' FLOPs without routing, which is the
limit a grouped GEMM can reach. Repetitions are interleaved (every repetition times every
candidate, in a rotating order) so that load from other processes spreads over all of them; the
script prints the medians and the ratios of those medians.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from typing import Callable

import torch

from moe_lm.config import ExpertConfig, LossConfig
from moe_lm.training.cpu_memory import freed_cpu_memory_kept, keep_freed_cpu_memory
from moe_lm.model.moe import MoE, SwiGLU

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


# ---------------------------------------------------------------- shared with bench_train.py
def environment_lines(threads: int) -> list[str]:
    """Machine, versions, threads, date and the command line, as markdown list items."""
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return [
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- machine: {cpu}, {os.cpu_count()} logical CPUs, GPU: {gpu}; load average at start "
        f"{load:.2f}",
        f"- versions: python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}",
        f"- threads: torch.get_num_threads() = {threads}; CPU malloc keeps freed memory (as in "
        f"moe_lm training, for every candidate): {freed_cpu_memory_kept()}",
        f"- command: `python {' '.join(sys.argv)}`",
    ]


def interleaved_medians(candidates: dict[str, Callable[[], None]], reps: int, warmup: int,
                        device: torch.device) -> dict[str, list[float]]:
    """Times each candidate `reps` times, interleaved in a rotating order; returns seconds
    (on a GPU the device is synchronized before and after each call)."""
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    names = list(candidates)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            _sync(device)
            start = time.perf_counter()
            candidates[name]()
            _sync(device)
            samples[name].append(time.perf_counter() - start)
    return samples


def measure_peak_flops(dtype: torch.dtype, device: torch.device, n: int | None = None,
                       reps: int = 10) -> float:
    """The machine's matrix-multiply FLOP/s: the best of `reps` timings of a batch of
    (n x n) @ (n x n) products on random data (n = 8192 on a GPU, 2048 on the CPU)."""
    n = n or (8192 if device.type == "cuda" else 2048)
    per_timing = 10 if device.type == "cuda" else 1  # GPU: enough work to hide the sync
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    best = float("inf")
    for _ in range(reps + 2):
        _sync(device)
        start = time.perf_counter()
        for _ in range(per_timing):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - start) / per_timing)
    return 2 * n ** 3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- the layers
def build_layers(T: int, E: int, k: int, D: int, F: int, dtype: torch.dtype, device: torch.device,
                 seed: int = 0, backend: str = "torch"):
    """moe_lm's MoE, the dense SwiGLU of the same FLOPs and the Mixtral block, same weights."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(seed)
    ours = MoE(D, ExpertConfig(num_experts=E, top_k=k, hidden_size=F, backend=backend),
               LossConfig())
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.0, 0.02)
    dense = SwiGLU(D, k * F)
    config = MixtralConfig(hidden_size=D, intermediate_size=F, num_local_experts=E,
                           num_experts_per_tok=k, router_jitter_noise=0.0)
    hf = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        hf.gate.weight.copy_(ours.router.gate.weight)
        ex = ours.experts  # gate_up (E, 2F, D) = [w1; w3]^T, down (E, D, F) = w2^T
        hf.experts.gate_up_proj.copy_(torch.cat([ex.w1_EDF, ex.w3_EDF], dim=2).transpose(1, 2))
        hf.experts.down_proj.copy_(ex.w2_EFD.transpose(1, 2))
        for p in dense.parameters():
            p.normal_(0.0, 0.02)
    return [m.to(device=device, dtype=dtype).train() for m in (ours, dense, hf)]


def forward_backward(layer: torch.nn.Module, x_BSD: torch.Tensor, dy_BSD: torch.Tensor,
                     kind: str) -> torch.Tensor:
    """One forward and backward of `layer`; returns the output (for the agreement check)."""
    for p in layer.parameters():
        p.grad = None
    x = x_BSD.detach().requires_grad_(True)
    y = layer(x)
    if kind == "moe_lm":
        y = y[0]  # (out, stats)
    y.backward(dy_BSD)
    return y.detach()


def _hf_block(hf, impl: str):
    hf.experts.config._experts_implementation = impl
    return hf


def _with_general_dispatch(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """fn run with the torch backend's general dispatch (index_copy / multiply / sum, what
    capacity dropping needs) in place of its dropless fast path: what the fast path saves."""
    from moe_lm.ops import torch_backend

    def run_general() -> torch.Tensor:
        default = torch_backend._dropless_fast_path
        torch_backend._dropless_fast_path = lambda x, order_M, assignments: False
        try:
            return fn()
        finally:
            torch_backend._dropless_fast_path = default

    return run_general


class _DenseWithRowMajorWeightGrads(torch.nn.Module):
    """The dense SwiGLU with w1/w3 run as moe_lm's grouped-GEMM pair with one group: on CPU its
    weight gradients come from a transposed copy of x (row-major left operand), the trick the
    experts use and `nn.Linear`'s backward does not. Not a ratio candidate: it shows how much of
    the MoE's ratio to the plain dense block comes from that trick rather than from dispatch."""

    def __init__(self, dense: torch.nn.Module):
        super().__init__()
        self.dense = dense

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        from moe_lm.ops import torch_backend

        d = self.dense
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        offs = torch.tensor([x_TD.shape[0]], dtype=torch.int32, device=x_TD.device)
        a, b = torch_backend.grouped_mm_pair(x_TD, d.w1.weight.t().unsqueeze(0),
                                         d.w3.weight.t().unsqueeze(0), offs)
        return d.w2(torch.nn.functional.silu(a) * b).view_as(x_BSD)


def run(args: argparse.Namespace) -> str:
    """Runs the benchmark and returns the markdown report it printed."""
    device = torch.device(args.device)
    if device.type == "cpu":
        keep_freed_cpu_memory()  # what a moe_lm training process does; applies to all candidates
    dtype = DTYPES[args.dtype]
    T, E, k, D, F = args.tokens, args.experts, args.top_k, args.d_model, args.hidden
    ours, dense, hf = build_layers(T, E, k, D, F, dtype, device)
    gen = torch.Generator().manual_seed(1)
    x_BSD = torch.randn(1, T, D, generator=gen).to(device, dtype)
    dy_BSD = torch.randn(1, T, D, generator=gen).to(device, dtype) / D ** 0.5

    hf_eager, hf_grouped = hf, hf  # one module; the implementation is switched per call
    candidates = {
        "dense SwiGLU (same FLOPs)": lambda: forward_backward(dense, x_BSD, dy_BSD, "dense"),
        "moe_lm MoE (torch backend)": lambda: forward_backward(ours, x_BSD, dy_BSD, "moe_lm"),
    }
    diffs = {}
    if device.type == "cuda":  # the Triton kernels run natively only on the GPU
        triton_layer = build_layers(T, E, k, D, F, dtype, device, backend="triton")[0]
        triton_layer.load_state_dict(ours.state_dict())
        candidates["moe_lm MoE (triton backend)"] = lambda: forward_backward(
            triton_layer, x_BSD, dy_BSD, "moe_lm")
        # not a ratio candidate: the torch backend without its dropless dispatch
        candidates["experiment: torch backend, general dispatch"] = _with_general_dispatch(
            lambda: forward_backward(ours, x_BSD, dy_BSD, "moe_lm"))
    if device.type == "cpu":  # not a ratio candidate: see _DenseWithRowMajorWeightGrads
        dense_pair = _DenseWithRowMajorWeightGrads(dense)
        candidates["experiment: dense SwiGLU, w1/w3 weight grads as moe_lm's"] = (
            lambda: forward_backward(dense_pair, x_BSD, dy_BSD, "dense"))
    candidates |= {
        "transformers Mixtral eager": lambda: forward_backward(
            _hf_block(hf_eager, "eager"), x_BSD, dy_BSD, "hf"),
        "transformers Mixtral grouped_mm": lambda: forward_backward(
            _hf_block(hf_grouped, "grouped_mm"), x_BSD, dy_BSD, "hf"),
    }
    # agreement: moe_lm and both transformers implementations compute the same layer
    y_ours = forward_backward(ours, x_BSD, dy_BSD, "moe_lm").float()
    if device.type == "cuda":
        y_tri = forward_backward(triton_layer, x_BSD, dy_BSD, "moe_lm").float()
        diffs["triton backend"] = ((y_ours - y_tri).abs().max()
                                   / y_ours.abs().max().clamp_min(1e-12)).item()
    for impl in ("eager", "grouped_mm"):
        y_hf = forward_backward(_hf_block(hf, impl), x_BSD, dy_BSD, "hf").float()
        diffs[impl] = ((y_ours - y_hf).abs().max() / y_ours.abs().max().clamp_min(1e-12)).item()

    samples = interleaved_medians(candidates, args.reps, args.warmup, device)
    med = {n: statistics.median(s) for n, s in samples.items()}
    flops = 3 * (2 * T * k * D * F * 3)  # three expert GEMMs, forward + 2x backward
    names = list(candidates)
    hf_names = [n for n in names if n.startswith("transformers")]
    ours_names = [n for n in names if n.startswith("moe_lm")]
    best_ours = min(ours_names, key=med.get)
    dense_t, ours_t = med[names[0]], med[best_ours]
    hf_best = min(med[n] for n in hf_names)
    lines = [f"## MoE layer forward+backward: T={T} E={E} k={k} D={D} F={F}, {args.dtype}, "
             f"{args.device}", "", *environment_lines(torch.get_num_threads()),
             f"- reps: {args.reps} interleaved (after {args.warmup} warm-up rounds); "
             "times are medians",
             "- agreement (max |other - moe_lm torch| / max |moe_lm torch| of the output): "
             + ", ".join(f"{n} {d:.2e}" for n, d in diffs.items()), "",
             "| layer | median ms | min ms | max ms | expert GEMM GFLOP/s | time / dense |",
             "|---|---:|---:|---:|---:|---:|"]
    for name in names:
        s = samples[name]
        lines.append(f"| {name} | {med[name] * 1e3:.1f} | {min(s) * 1e3:.1f} | "
                     f"{max(s) * 1e3:.1f} | {flops / med[name] / 1e9:.0f} | "
                     f"{med[name] / dense_t:.2f} |")
    lines += ["",
              f"- moe_lm ({best_ours.split('(')[-1].rstrip(')')}) / dense time: "
              f"**{ours_t / dense_t:.2f}x** (target <= 1.15x)",
              f"- faster transformers / moe_lm time: **{hf_best / ours_t:.2f}x** ("
              + ", ".join(f"{n.split()[-1]} {med[n] / ours_t:.2f}x" for n in hf_names)
              + "; target >= 1.3x)"]
    pair_name = next((n for n in names if n.startswith("experiment: dense")), None)
    if pair_name:
        lines.append(f"- moe_lm / the dense block with moe_lm's w1/w3 weight gradients: "
                     f"{ours_t / med[pair_name]:.2f}x (dense itself {dense_t / med[pair_name]:.2f}x"
                     " that time)")
    lines.append("")
    report = "\n".join(lines)
    print(report, flush=True)
    return report


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096, help="T, tokens in the batch")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--hidden", type=int, default=1024, help="F, each expert's hidden width")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="T=512, D=128, F=256, 3 reps")
    p.add_argument("--markdown", default=None, help="append the report to this markdown file")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.d_model, args.hidden, args.reps, args.warmup = 512, 128, 256, 3, 1
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    report = run(args)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(report + "\n")


if __name__ == "__main__":
    main()
