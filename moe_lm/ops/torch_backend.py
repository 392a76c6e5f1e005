"""The `torch` backend: the kernel API in PyTorch, always available; the fast path on CPU.

Legend: T tokens, k assignments per token, M = kept assignments (<= T*k), E experts, D/K/N widths.
`order` may omit assignments (capacity dropping, expert choice): those contribute nothing. Beyond
the kernel API, `TorchBackend.route_for_layer` pads each expert's rows to a multiple of an
alignment (`route_aligned`) with padding entries (values >= T*k) that `gather` fills with zeros
and `scatter` ignores (moe_lm.ops.torch_dropless; on CPU, where the caller allows it), and
`grouped_mm_pair` runs the experts' w1/w3 products with one backward (moe_lm.ops.torch_gemm_pair).
Without autograd on a CPU (generation, evaluation) both run as the per-expert loop instead.
The plain, obviously-correct version that tests check this against is moe_lm.ops.reference.
"""

from __future__ import annotations

import torch

from moe_lm.ops.backend import ExpertBackend
from moe_lm.ops.torch_dropless import (CombinePermuted, GatherPermuted, route_aligned,  # noqa: F401
                                       row_alignment)
from moe_lm.ops.torch_gemm_pair import GroupedMMPair


def route(expert_idx_Tk: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable sort of the flattened assignments by expert; returns (order (T*k,), counts (E,))."""
    flat = expert_idx_Tk.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    # not bincount: on CUDA it reads the largest index back to the host (a sync per layer)
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device)
    counts.scatter_add_(0, flat.long(), torch.ones_like(flat, dtype=torch.long))
    return order, counts


def gather(x_TD: torch.Tensor, order_M: torch.Tensor, top_k: int) -> torch.Tensor:
    """Rows of x in expert order, each token repeated per assignment: (M, D) = x[order // k]."""
    T, D = x_TD.shape
    if _dropless_fast_path(x_TD, order_M, T * top_k):
        return GatherPermuted.apply(x_TD, order_M, top_k)
    x_TkD = x_TD.unsqueeze(1).expand(T, top_k, D).reshape(T * top_k, D)
    return _UniqueRowSelect.apply(x_TkD, order_M)


def scatter(y_MD: torch.Tensor, order_M: torch.Tensor, weights_Tk: torch.Tensor) -> torch.Tensor:
    """Back to token order with the combine: out[t] = sum_j w[t, j] * y[pos(t*k + j)]; (T, D)."""
    T, k = weights_Tk.shape
    if _dropless_fast_path(y_MD, order_M, T * k):
        return CombinePermuted.apply(y_MD, order_M, weights_Tk.to(y_MD.dtype),
                                     y_MD.device.type == "cpu")
    y_TkD = y_MD.new_zeros(T * k, y_MD.shape[1]).index_copy(0, order_M, y_MD)
    return (y_TkD.view(T, k, -1) * weights_Tk.to(y_MD.dtype).unsqueeze(-1)).sum(1)


def _dropless_fast_path(x: torch.Tensor, order_M: torch.Tensor, assignments: int) -> bool:
    """Dropless: order is a permutation of all T*k assignments, or of more with padding entries
    (`route_aligned`); meta tensors, for shapes only, take the general path."""
    return order_M.numel() >= assignments and x.device.type != "meta"


class _UniqueRowSelect(torch.autograd.Function):
    """`src[idx]` for indices without repeats. Its backward is a plain copy (`index_copy`), not
    the atomic-add scatter that `index_select`'s backward uses, which is slow on CPU."""

    @staticmethod
    def forward(ctx, src_ND: torch.Tensor, idx_M: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(idx_M)
        ctx.n_rows = src_ND.shape[0]
        return src_ND.index_select(0, idx_M)

    @staticmethod
    def backward(ctx, grad_MD: torch.Tensor):
        (idx_M,) = ctx.saved_tensors
        grad_ND = grad_MD.new_zeros(ctx.n_rows, grad_MD.shape[1])
        return grad_ND.index_copy_(0, idx_M, grad_MD), None


def grouped_mm(x_TK: torch.Tensor, w_EKN: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """`torch._grouped_mm` semantics for 2D x 3D: rows offs[e-1]:offs[e] of x times w[e], zeros
    for rows past offs[-1]. `torch._grouped_mm` leaves those rows unwritten: on CPU such calls
    take the loop (reading offs[-1] costs nothing there); on CUDA checking would cost a
    host-device sync per call, so the rows stay as the op leaves them (the MoE layer and expert
    parallelism always cover every row)."""
    if _cpu_inference(x_TK):
        return grouped_mm_loop(x_TK, w_EKN, offs_E)
    if _native_grouped_mm_ok(x_TK, w_EKN) and not _cpu_rows_past_groups(x_TK, offs_E):
        out = torch._grouped_mm(x_TK.contiguous(), w_EKN, offs=offs_E.to(torch.int32))
        return _ContiguousGrad.apply(out)
    return grouped_mm_loop(x_TK, w_EKN, offs_E)


def _cpu_inference(x_TK: torch.Tensor) -> bool:
    """No autograd on CPU (generation, evaluation): the per-expert loop, which skips empty
    groups and the autograd wrappers; at decoding's few rows those wrappers, not the
    products, were most of the layer's time (profile in experiments/results/
    bench_generate_2026-12-02.md). Same per-group products as `torch._grouped_mm` on CPU."""
    return (x_TK.device.type == "cpu" and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling())


def _cpu_rows_past_groups(x_TK: torch.Tensor, offs_E: torch.Tensor) -> bool:
    if x_TK.device.type != "cpu" or torch.compiler.is_compiling() or offs_E.numel() == 0:
        return False  # (compiled: offs has no value at trace time; the layer covers every row)
    return int(offs_E[-1]) < x_TK.shape[0]


def grouped_mm_pair(x_TK: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor,
                    offs_E: torch.Tensor, gmm=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(gmm(x, w_a, offs), gmm(x, w_b, offs)), `gmm` this module's `grouped_mm` by default; on
    CPU one backward that accumulates the input's two gradients in place
    (moe_lm.ops.torch_gemm_pair)."""
    gmm = gmm or grouped_mm
    if _cpu_inference(x_TK):
        return gmm(x_TK, w_a, offs_E), gmm(x_TK, w_b, offs_E)
    if x_TK.device.type == "cpu" and not torch.compiler.is_compiling():
        return GroupedMMPair.apply(x_TK, w_a, w_b, offs_E, gmm)
    return gmm(x_TK, w_a, offs_E), gmm(x_TK, w_b, offs_E)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient dense: `torch._grouped_mm`'s backward
    rejects the stride-0 gradients that e.g. `y.sum().backward()` produces."""

    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def grouped_mm_loop(x_TK: torch.Tensor, w_EKN: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """The per-expert loop: the fallback where `torch._grouped_mm` is unsupported."""
    out = x_TK.new_empty(x_TK.shape[0], w_EKN.shape[2])
    ends = offs_E.tolist()
    start = 0
    for e, end in enumerate(ends):
        if end > start:
            out[start:end] = x_TK[start:end] @ w_EKN[e]
        start = end
    if start < x_TK.shape[0]:  # rows past the last offset belong to no group
        out[start:] = 0
    return out


def _native_grouped_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """`torch._grouped_mm` runs on CUDA (sm90+, bf16) and, in recent torch, on CPU."""
    if not hasattr(torch, "_grouped_mm") or x.device.type == "meta" or x.dtype != w.dtype:
        return False
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        return False  # the op's compile-time (meta) check accepts bf16 only
    aligned = all((n * x.element_size()) % 16 == 0 for n in (x.shape[1], w.shape[2]))
    if not aligned:  # the op requires 16-byte aligned row strides
        return False
    if x.device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(x.device)
        return major >= 9 and x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16
    return x.device.type == "cpu" and _cpu_grouped_mm_works(x.dtype)


_CPU_SUPPORT: dict = {}  # dtype -> bool, probed once (a cache, not state)
_PROBED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def probe_native_support() -> None:
    """Finds out once whether this torch runs `torch._grouped_mm` (and its backward) on CPU.

    Called when the backend is chosen, outside any forward: probing inside the first forward
    would run under `no_grad` (evaluation: the backward cannot run, so the op would be wrongly
    marked unsupported) or inside an activation-checkpointed block (extra ops in the forward
    that the recomputation does not repeat)."""
    for dtype in _PROBED_DTYPES:
        _cpu_grouped_mm_works(dtype)


def _cpu_grouped_mm_works(dtype: torch.dtype) -> bool:
    if dtype not in _CPU_SUPPORT:
        try:
            with torch.enable_grad():  # explicit device: also right under a meta default device
                x = torch.ones(3, 8, dtype=dtype, device="cpu", requires_grad=True)
                w = torch.ones(2, 8, 16, dtype=dtype, device="cpu", requires_grad=True)
                offs = torch.tensor([1, 3], dtype=torch.int32, device="cpu")
                y = torch._grouped_mm(x, w, offs=offs)
                y.backward(torch.ones_like(y).contiguous())
            _CPU_SUPPORT[dtype] = bool(torch.allclose(y.detach().float(),
                                                      torch.full((3, 16), 8.0)))
        except (RuntimeError, NotImplementedError, TypeError, AttributeError):
            _CPU_SUPPORT[dtype] = False
    return _CPU_SUPPORT[dtype]


class TorchBackend(ExpertBackend):
    """`expert.backend=torch`: this module's functions behind the backend seam."""

    name = "torch"

    def __init__(self):
        probe_native_support()

    route = staticmethod(route)
    gather = staticmethod(gather)
    scatter = staticmethod(scatter)
    grouped_mm = staticmethod(grouped_mm)

    def route_for_layer(self, expert_idx_Tk: torch.Tensor, num_experts: int,
                        may_pad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pads the expert groups to an aligned row count where allowed and worth it (CPU:
        faster GEMM tiles, see `row_alignment`); the padding rows are zeros the combine ignores."""
        align = row_alignment(expert_idx_Tk, expert_idx_Tk.shape[1], num_experts) if may_pad else 1
        if align > 1:
            return route_aligned(expert_idx_Tk, num_experts, align)
        order_M, counts_E = route(expert_idx_Tk, num_experts)
        return order_M, counts_E, counts_E

    def grouped_mm_pair(self, x_TK: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor,
                        offs_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both products; on CPU with one backward (moe_lm.ops.torch_gemm_pair)."""
        return grouped_mm_pair(x_TK, w_a, w_b, offs_E, self.grouped_mm)
