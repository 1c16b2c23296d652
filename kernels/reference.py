"""Plain-PyTorch versions of the kernels: the CPU path and the oracle of every test.

masked_linear works on *compact* activations: with `live_out` the output holds only the
alive output features, with `live_in` the input holds only the alive input features.
That is what makes dead rows and columns free: a pruned head or neuron is never computed,
read or written. Equivalently, y = x·(W⊙M)ᵀ + b restricted to the alive outputs, with x
zero outside the alive inputs.

group_reg computes the squared L2 norm of every prunable group of a ViT (heads and MLP
neurons of every block) and adds the RSST penalty gradient of the target groups, for all
layers at once, without a host synchronization.
"""
from typing import List, NamedTuple, Optional

import torch
import torch.nn.functional as F


def as_index(live: Optional[torch.Tensor], size: int) -> Optional[torch.Tensor]:
    """Bool mask or index tensor -> sorted int64 index tensor (None stays None = all alive)."""
    if live is None:
        return None
    if live.dtype == torch.bool:
        if live.numel() != size:
            raise ValueError(f"bool live mask has {live.numel()} entries, expected {size}")
        return live.nonzero().flatten()
    return live.long()


def masked_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  live_out: Optional[torch.Tensor] = None, live_in: Optional[torch.Tensor] = None,
                  mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x · (W⊙M)[live_out][:, live_in]ᵀ + b[live_out].

    x: [..., len(live_in)] (or [..., in_features] when live_in is None).
    y: [..., len(live_out)] (or [..., out_features] when live_out is None).
    mask: element mask shaped like `weight` (bool or float), e.g. for unstructured pruning.
    Gradients of dead rows/columns (and of masked elements) are exactly zero.
    """
    live_out = as_index(live_out, weight.shape[0])
    live_in = as_index(live_in, weight.shape[1])
    w = weight if mask is None else weight * mask.to(weight.dtype)
    b = bias
    if live_out is not None:
        w = w.index_select(0, live_out)
        b = None if bias is None else bias.index_select(0, live_out)
    if live_in is not None:
        w = w.index_select(1, live_in)
    return F.linear(x, w, b)


class PrunableParams(NamedTuple):
    """The tensors of the prunable groups of every block, one list entry per block.

    head h of a block: rows {j·H·hd + h·hd + d} of qkv (q, k, v) and their bias entries,
    and columns {h·hd + d} of proj.  neuron n: row n of fc1, bias n of fc1, column n of fc2.
    The same tuple type carries the gradients (or, for decoupled updates, the weights again).
    """
    qkv_w: List[torch.Tensor]   # [3·H·hd, D]
    qkv_b: List[torch.Tensor]   # [3·H·hd]
    proj_w: List[torch.Tensor]  # [D, H·hd]
    fc1_w: List[torch.Tensor]   # [M, D]
    fc1_b: List[torch.Tensor]   # [M]
    fc2_w: List[torch.Tensor]   # [D, M]


def group_sums(params: PrunableParams, num_heads: int, fn=torch.square):
    """Σ fn(w) over the entries of every group: ([L, H] heads, [L, M] neurons), fp32.
    fn=torch.square gives squared L2 norms, fn=torch.abs L1 norms."""
    L, H = len(params.qkv_w), num_heads
    qkv_w = torch.stack(params.qkv_w).float()
    D = qkv_w.shape[-1]
    heads = (fn(qkv_w.view(L, 3, H, -1, D)).sum((1, 3, 4))
             + fn(torch.stack(params.qkv_b).float().view(L, 3, H, -1)).sum((1, 3))
             + fn(torch.stack(params.proj_w).float().view(L, D, H, -1)).sum((1, 3)))
    neurons = (fn(torch.stack(params.fc1_w).float()).sum(2)
               + fn(torch.stack(params.fc1_b).float())
               + fn(torch.stack(params.fc2_w).float()).sum(1))
    return heads, neurons


def group_sq_norms(params: PrunableParams, num_heads: int):
    """Squared L2 norms of every group: ([L, H] heads, [L, M] neurons), fp32."""
    return group_sums(params, num_heads, torch.square)


def group_reg(params: PrunableParams, grads: PrunableParams, head_targets: torch.Tensor,
              neuron_targets: torch.Tensor, lam: float, kind: str = "l2"):
    """Add the RSST penalty gradient of the target groups to `grads`, in place.

    head_targets [L, H], neuron_targets [L, M]: 1 for a target group, 0 otherwise.
    Float targets scale lam per group.
    kind="l2":          g += lam · w
    kind="group_lasso": g += max(lam / ‖w_g‖, -1) · w   (nothing for a group whose norm is 0)
    `grads` may be `params` itself: then this is the decoupled update w += lam·w (pass
    lam = -lr·λ); for group_lasso it is the proximal step w_g ← w_g·max(0, 1 − step/‖w_g‖)
    (lam = -step): a group whose norm is below the step lands on zero, never flips sign.
    Norms are taken before the update. Returns the squared group norms ([L, H], [L, M]).
    """
    if kind not in ("l2", "group_lasso"):
        raise ValueError(f"kind must be 'l2' or 'group_lasso', got {kind!r}")
    L, H = head_targets.shape
    heads_sq, neurons_sq = group_sq_norms(params, H)
    head_c = head_targets.float() * lam
    neuron_c = neuron_targets.float() * lam
    if kind == "group_lasso":  # the proximal step lands a group on zero, never past it
        head_c = torch.where(heads_sq > 0, head_c * heads_sq.rsqrt(), torch.zeros_like(head_c)).clamp(min=-1)
        neuron_c = torch.where(neurons_sq > 0, neuron_c * neurons_sq.rsqrt(), torch.zeros_like(neuron_c)).clamp(min=-1)
    hd = params.qkv_w[0].shape[0] // (3 * H)
    dt = params.qkv_w[0].dtype
    # Per-row / per-column coefficients, stacked for all layers, then split into views:
    # one foreach call per tensor kind instead of a Python loop over layers.
    qkv_rows = head_c[:, None, :, None].expand(L, 3, H, hd).reshape(L, -1).to(dt)
    proj_cols = head_c[:, :, None].expand(L, H, hd).reshape(L, -1).to(dt)
    neuron_c = neuron_c.to(dt)
    torch._foreach_addcmul_(grads.qkv_w, params.qkv_w, list(qkv_rows[:, :, None].unbind(0)))
    torch._foreach_addcmul_(grads.qkv_b, params.qkv_b, list(qkv_rows.unbind(0)))
    torch._foreach_addcmul_(grads.proj_w, params.proj_w, list(proj_cols[:, None, :].unbind(0)))
    torch._foreach_addcmul_(grads.fc1_w, params.fc1_w, list(neuron_c[:, :, None].unbind(0)))
    torch._foreach_addcmul_(grads.fc1_b, params.fc1_b, list(neuron_c.unbind(0)))
    torch._foreach_addcmul_(grads.fc2_w, params.fc2_w, list(neuron_c[:, None, :].unbind(0)))
    return heads_sq, neurons_sq
