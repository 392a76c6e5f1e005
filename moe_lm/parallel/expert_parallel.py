"""Expert parallelism: each EP rank holds E/ep experts; tokens travel to them and back.

Legend: M assignments on this rank (sorted by global expert), E experts, El = E/ep local experts,
P EP ranks, R rows received from all EP ranks, D model width.

    dispatch: counts (P, El) --all_to_all--> counts received (P, El)   (split sizes first)
              x_MD --all_to_all_single(splits)--> x_RD, rows ordered (source rank, local expert)
              permute to local-expert order -> grouped GEMM through the backend seam
    combine:  un-permute -> all_to_all_single back -> x_MD order, combined by the MoE layer

Dropless: every routed row reaches its expert; the buffers are sized by the exchanged counts.
The same dispatcher also makes the switch balance loss see the whole data-parallel batch (global
expert fractions), so that N ranks with batch B train exactly like one process with batch N*B.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor

from moe_lm.model.dispatch import Dispatcher
from moe_lm.model.router_losses import load_balance_loss
from moe_lm.ops import ExpertBackend


class _AllToAll(torch.autograd.Function):
    """Differentiable `all_to_all_single` of rows; the backward sends gradients the reverse way."""

    @staticmethod
    def forward(ctx, x_ND, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x_ND.new_empty((sum(out_splits), *x_ND.shape[1:]))
        dist.all_to_all_single(out, x_ND.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        out_splits, in_splits = ctx.splits
        grad_in = grad_out.new_empty((sum(in_splits), *grad_out.shape[1:]))
        dist.all_to_all_single(grad_in, grad_out.contiguous(), in_splits, out_splits,
                               group=ctx.group)
        return grad_in, None, None, None


def all_to_all_rows(x_ND: torch.Tensor, out_splits: list[int], in_splits: list[int],
                    group: dist.ProcessGroup) -> torch.Tensor:
    """Sends `in_splits[j]` consecutive rows to rank j and receives `out_splits[j]` from it."""
    return _AllToAll.apply(x_ND, out_splits, in_splits, group)


class ExpertParallelDispatcher(Dispatcher):
    """A MoE layer's dispatch across ranks; given to each layer by `parallelize`.

    The rows keep their real counts (no padding rows: those would travel and be counted by the
    all-to-all split sizes), whether or not an EP group splits the experts.

    Args:
        num_experts: E, the global number of experts.
        dp_group: every rank that holds a different slice of the batch (the balance loss sees
            their routing counts together).
        ep_group: the EP ranks that split the experts; None runs all experts locally.
    """

    def __init__(self, num_experts: int, dp_group: dist.ProcessGroup | None,
                 ep_group: dist.ProcessGroup | None):
        self.num_experts = num_experts
        self.dp_group, self.ep_group = dp_group, ep_group
        self.ep_size = 1 if ep_group is None else dist.get_world_size(ep_group)

    # ------------------------------------------------------------------ balance loss

    def balance_loss(self, probs_TE: torch.Tensor, expert_idx_Tk: torch.Tensor,
                     seq_len: int | None) -> torch.Tensor:
        """Switch loss E * sum_i f_i * P_i with f_i over the whole data-parallel batch.

        P_i is this rank's mean router probability; averaging the ranks' losses (what gradient
        averaging does) gives E * sum_i f_i * mean_ranks(P_i): the single-process loss of the
        concatenated batch. f is counts, outside the gradient, so one all-reduce of E+1 numbers.
        The per-sequence variant (`seq_len`) needs no other rank's counts.
        """
        if seq_len is not None:
            return load_balance_loss(probs_TE, expert_idx_Tk, seq_len)
        E = self.num_experts
        flat = expert_idx_Tk.reshape(-1)
        counts = torch.zeros(E + 1, device=flat.device, dtype=torch.float32)
        counts[:E].scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))
        counts[E] = flat.numel()
        if self.dp_group is not None and counts.device.type != "meta":
            dist.all_reduce(counts, group=self.dp_group)
        f_E = counts[:E] / counts[E].clamp_min(1)
        return E * (f_E * probs_TE.mean(0)).sum()

    # ------------------------------------------------------------------ expert computation

    def run_experts(self, experts: nn.Module, x_MD: torch.Tensor, counts_E: torch.Tensor,
                    backend: ExpertBackend) -> torch.Tensor:
        """y_MD = experts(x_MD) where row block e of x (counts_E[e] rows) goes to expert e,
        wherever that expert lives. Without an EP group this is the local grouped GEMM."""
        if self.ep_group is None:
            return experts(x_MD, counts_E.cumsum(0).to(torch.int32), backend)
        P, El = self.ep_size, self.num_experts // self.ep_size
        send_PE = counts_E.reshape(P, El).to(torch.int64)
        recv_PE = self._exchange_counts(send_PE)
        in_splits, out_splits = self._splits(send_PE, recv_PE, x_MD.shape[0])
        x_RD = all_to_all_rows(x_MD, out_splits, in_splits, self.ep_group)
        # rows arrive grouped by (source rank, local expert); the grouped GEMM wants expert-major
        expert_of_R = torch.repeat_interleave(
            torch.arange(El, device=x_RD.device).repeat(P), recv_PE.reshape(-1),
            output_size=x_RD.shape[0])
        order_R = torch.sort(expert_of_R, stable=True).indices
        x_local = backend.gather(x_RD, order_R, 1)
        offs_El = recv_PE.sum(0).cumsum(0).to(torch.int32)
        y_local = experts(x_local, offs_El, backend)
        y_RD = backend.gather(y_local, torch.argsort(order_R), 1)  # back to arrival order
        return all_to_all_rows(y_RD, in_splits, out_splits, self.ep_group)

    def _exchange_counts(self, send_PE: torch.Tensor) -> torch.Tensor:
        """recv[j, e]: rows rank j sends to this rank's local expert e."""
        recv_PE = torch.empty_like(send_PE)
        if send_PE.device.type == "meta":  # planning: assume balanced routing
            return recv_PE
        dist.all_to_all_single(recv_PE, send_PE.contiguous(), group=self.ep_group)
        return recv_PE

    def _splits(self, send_PE, recv_PE, rows: int) -> tuple[list[int], list[int]]:
        if send_PE.device.type == "meta":
            even = [rows // self.ep_size] * self.ep_size
            even[-1] += rows - sum(even)
            return even, even
        both = torch.stack([send_PE.sum(1), recv_PE.sum(1)]).tolist()  # one device->host copy
        return both[0], both[1]


def distribute_experts(experts: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Replaces each expert weight (E, ., .) by a DTensor split by expert (Shard(0)) over ep.

    No communication: every rank keeps its own block of experts of the tensor it already has
    (on the meta device that block is a shape only). Checkpoints then see the global (E, ., .)
    tensor, so they load under any EP degree.
    """
    for name, param in list(experts.named_parameters(recurse=False)):
        dt = distribute_tensor(param.detach(), ep_mesh, [Shard(0)], src_data_rank=None)
        experts.register_parameter(name, nn.Parameter(dt, requires_grad=param.requires_grad))

