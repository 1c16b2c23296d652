"""Group importance and keep-set selection.

Importance is measured on the trained weights of the state that just ended. Dead groups
score -inf, so a removed group never returns (the selection is monotone).
"""
import math

import torch
import torch.nn.functional as F

from vitprune.kernels.reference import group_sums
from vitprune.structure import PRUNABLE_WEIGHTS, Structure, dims, prunable_params


def keep_fraction(schedule: str, state: int, states: int, prune: float) -> float:
    """Fraction of a kind's groups kept in `state` (state 0 is dense)."""
    if state == 0 or prune == 0:
        return 1.0
    if schedule == "oneshot":
        return 1.0 - prune
    return (1.0 - prune) ** (state / (states - 1))  # geometric


@torch.no_grad()
def magnitude_scores(model):
    """L1 norm of each group's weights and bias entries, in and out: ([L, H], [L, M])."""
    heads, neurons = group_sums(prunable_params(model), dims(model)[1], torch.abs)
    return heads.cpu(), neurons.cpu()


@torch.no_grad()
def remain_scores(model, keep: float):
    """Weights of each group that survive a global unstructured magnitude prune keeping
    `keep` of all prunable weights (the original Refill criterion)."""
    params = prunable_params(model)
    flat = torch.cat([w.detach().abs().float().flatten() for w in params.qkv_w + params.proj_w +
                      params.fc1_w + params.fc2_w])
    k = max(1, round(keep * flat.numel()))
    threshold = flat.kthvalue(flat.numel() - k + 1).values  # the k-th largest magnitude
    # Bias entries are not weights and never survive the prune: NaN fails every comparison.
    without_biases = params._replace(qkv_b=[torch.full_like(b, math.nan) for b in params.qkv_b],
                                     fc1_b=[torch.full_like(b, math.nan) for b in params.fc1_b])
    heads, neurons = group_sums(without_biases, dims(model)[1], lambda w: (w.abs() >= threshold).float())
    return heads.cpu(), neurons.cpu()


def activation_scores(model, data, criterion: str, batches: int, batch_size: int, seed: int, state: int):
    """l1: mean |output|, l2: RMS of output, saliency: |Σ output·∂loss/∂output| (first-order
    Taylor estimate of the loss change when the group is removed), averaged over `batches`
    calibration batches of training images. A head's output is its attention output (the
    hd features it feeds to proj); a neuron's output is its activation (what fc2 reads)."""
    L, H, hd, D, M = dims(model)
    device = next(model.parameters()).device
    heads = torch.zeros(L, H, device=device)
    neurons = torch.zeros(L, M, device=device)
    modules = {id(b.attn): (l, "attn") for l, b in enumerate(model.blocks)}
    modules.update({id(b.mlp): (l, "mlp") for l, b in enumerate(model.blocks)})

    def reduce(x, dim_groups):
        if criterion == "l1":
            return x.abs().mean(dim_groups)
        return x.square().mean(dim_groups)  # l2: mean square now, sqrt at the end

    def observe(module, out):
        l, kind = modules[id(module)]
        if kind == "attn":
            index = module.live_heads()
            split, target = (len(index), hd), heads[l]   # [B, N, heads, hd]
        else:
            index = module.live_neurons()
            split, target = (len(index), 1), neurons[l]  # [B, N, neurons, 1]
        x = out.detach().float().unflatten(-1, split)
        if criterion == "saliency":
            # The hook sits on the tensor the forward really uses, so it sees its gradient.
            def taylor(grad):
                target.index_add_(0, index, (grad.float().unflatten(-1, split) * x).sum((1, 3)).abs().sum(0) / len(x))
            out.register_hook(taylor)
        else:
            target.index_add_(0, index, reduce(x, (0, 1, 3)))

    g = torch.Generator().manual_seed(seed * 7919 + state)
    idx = torch.randperm(len(data.train_y), generator=g)[:batches * batch_size]
    was_training = model.training
    model.eval()
    _observe(model, observe)
    try:
        n = 0
        for x, y in data.batches("train", batch_size, index=idx):
            if criterion == "saliency":
                with torch.enable_grad():
                    F.cross_entropy(model(x), y).backward()
            else:
                with torch.no_grad():
                    model(x)
            n += 1
    finally:
        _observe(model, None)
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    heads, neurons = heads / n, neurons / n
    if criterion == "l2":
        heads, neurons = heads.sqrt(), neurons.sqrt()
    return heads.cpu(), neurons.cpu()


def _observe(model, observer):
    for block in model.blocks:
        block.attn.observe(observer)
        block.mlp.observe(observer)


def importance(model, structure: Structure, criterion: str, data=None, keep: float = 1.0,
               batches: int = 8, batch_size: int = 128, seed: int = 0, state: int = 0):
    """Scores ([L, H], [L, M]) of every group; dead groups get -inf."""
    L, H, _, _, M = dims(model)
    if criterion == "magnitude":
        heads, neurons = magnitude_scores(model)
    elif criterion == "remain":
        heads, neurons = remain_scores(model, keep)
    elif criterion == "random":
        g = torch.Generator().manual_seed(seed * 7919 + state)
        heads, neurons = torch.rand(L, H, generator=g), torch.rand(L, M, generator=g)
    else:
        heads, neurons = activation_scores(model, data, criterion, batches, batch_size, seed, state)
    heads = heads.masked_fill(~structure.heads, -math.inf)
    neurons = neurons.masked_fill(~structure.neurons, -math.inf)
    return heads, neurons


def keep_set(scores: torch.Tensor, alive: torch.Tensor, keep: float, sorting: str, min_keep: int) -> torch.Tensor:
    """Bool keep mask [L, G]: the best `keep` fraction of the groups, ranked across all layers
    (global) or inside each layer (layerwise); every layer keeps >= min_keep groups; only
    alive groups are kept (never more than are alive)."""
    L, G = scores.shape
    if keep >= 1.0:
        return alive.clone()
    # Stable ranking: ties break by position, so the selection is deterministic.
    order_in_layer = torch.sort(scores, dim=1, descending=True, stable=True).indices
    if sorting == "layerwise":
        n = min(max(min_keep, round(keep * G)), G)
        kept = torch.zeros(L, G, dtype=torch.bool)
        kept.scatter_(1, order_in_layer[:, :n], True)
        return kept & alive
    n = min(max(L * min_keep, round(keep * L * G)), int(alive.sum()))
    kept = torch.zeros(L, G, dtype=torch.bool)
    kept.scatter_(1, order_in_layer[:, :min_keep], True)  # each layer's best min_keep first
    rest = scores.masked_fill(kept, -math.inf).flatten()
    extra = n - int(kept.sum())
    if extra > 0:
        kept.view(-1)[torch.sort(rest, descending=True, stable=True).indices[:extra]] = True
    return kept & alive


@torch.no_grad()
def keep_elements(model, structure: Structure, keep: float) -> dict:
    """Global unstructured magnitude pruning: element masks keeping `keep` of all prunable
    weights (already-pruned weights are zero and rank last)."""
    names = [f"blocks.{l}.{n}" for l in range(len(model.blocks)) for n in PRUNABLE_WEIGHTS]
    weights = [model.get_parameter(n).detach().abs().float().cpu() for n in names]
    if structure.elements is not None:
        weights = [w.masked_fill(~structure.elements[n], -1.0) for w, n in zip(weights, names)]
    flat = torch.cat([w.flatten() for w in weights])
    k = round(keep * flat.numel())
    keep_flat = torch.zeros(flat.numel(), dtype=torch.bool)
    keep_flat[torch.sort(flat, descending=True, stable=True).indices[:k]] = True
    masks, start = {}, 0
    for n, w in zip(names, weights):
        masks[n] = keep_flat[start:start + w.numel()].view(w.shape)
        start += w.numel()
    return masks
