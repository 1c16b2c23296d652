"""Group importance and keep-set selection (`select`: vitprune.select, and the loop's).

Importance is measured on the trained weights of the state that just ended. Dead groups
score -inf, so a removed group never returns (the selection is monotone). Under
torch.distributed every process keeps the same groups: the activation criteria's sums are
all-reduced (every process's batches count), and the first process's keep set is broadcast.
"""
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from vitprune.config import check_value, prune_ratios
from vitprune.errors import ConfigError
from vitprune.kernels.reference import group_sums
from vitprune.structure import PRUNABLE_WEIGHTS, Structure, dims, group_sizes, prunable_params

ACTIVATION_CRITERIA = ("l1", "l2", "saliency")  # they need batches


def keep_fraction(schedule: str, state: int, states: int, prune: float) -> float:
    """Fraction of a kind's groups kept in `state` (state 0 is dense)."""
    if state == 0 or prune == 0:
        return 1.0
    if schedule == "oneshot":
        return 1.0 - prune
    return (1.0 - prune) ** (state / (states - 1))  # geometric


def pruned_fraction(schedule: str, state: int, states: int, prune: float) -> float:
    """Fraction of a kind's groups removed by `state`: select's ratio. One-shot passes `prune`
    itself, so select's 1 - ratio is keep_fraction's 1 - prune to the bit."""
    return prune if schedule == "oneshot" and state > 0 else 1.0 - keep_fraction(schedule, state, states, prune)


def select(model, ratio: float = 0.7, *, head_ratio=None, mlp_ratio=None, target: str = "both", min_keep: int = 1,
           round_to: int = 1, criterion: str = "magnitude", sorting: str = "global", batches=None,
           seed: int = 0) -> Structure:
    """The groups a prunable model (model.prunable) keeps: the best by `criterion` among those
    alive in it now. Ratios are fractions of all its groups, dense count (so a second select
    from a pruned model prunes further); the arguments mean what the flags of the same names
    do (docs/flags.md#pruning). batches: iterable of (x, y) on the model's device for the
    l1, l2 and saliency criteria; seed: the random criterion's. Prunes nothing: apply it with
    structure.apply_structure (vitprune.apply)."""
    for name, value in (("ratio", ratio), ("head_ratio", head_ratio), ("mlp_ratio", mlp_ratio), ("target", target),
                        ("min_keep", min_keep), ("round_to", round_to), ("criterion", criterion),
                        ("sorting", sorting), ("seed", seed)):
        check_value(name, value, label=f"select: {name}")
    if criterion in ACTIVATION_CRITERIA and batches is None:
        raise ConfigError(f"select: criterion={criterion!r} measures activations: give batches, an iterable of "
                          f"(x, y) training batches")
    alive = Structure.live(model)
    keep_h, keep_n = (1.0 - r for r in prune_ratios(ratio, head_ratio, mlp_ratio, target))
    head_size, neuron_size = group_sizes(model)
    L, H, _, _, M = dims(model)
    # remain: the unstructured prune keeps the same share of the prunable weights.
    keep_w = (keep_h * L * H * head_size + keep_n * L * M * neuron_size) / (L * H * head_size + L * M * neuron_size)
    heads, neurons = importance(model, alive, criterion, batches, keep_w, seed)
    kept = Structure(keep_set(heads, alive.heads, keep_h, sorting, min_keep),
                     keep_set(neurons, alive.neurons, keep_n, sorting, min_keep, round_to))
    return same_on_every_process(kept, model.blocks[0].attn.qkv.weight.device)


def same_on_every_process(structure: Structure, device) -> Structure:
    """The first process's keep set on every process (torch.distributed; else `structure`)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return structure
    flat = torch.cat([structure.heads.flatten(), structure.neurons.flatten()]).to(device, torch.uint8)
    dist.broadcast(flat, src=0)
    heads, neurons = flat.cpu().bool().split([structure.heads.numel(), structure.neurons.numel()])
    return Structure(heads.view_as(structure.heads), neurons.view_as(structure.neurons))


def calibration_batches(data, batches: int, batch_size: int, seed: int):
    """The loop's calibration batches for the activation criteria: `batches` batches of
    training images, not augmented, drawn with `seed`."""
    idx = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(seed))[:batches * batch_size]
    return data.batches("train", batch_size, index=idx)


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


def activation_scores(model, batches, criterion: str):
    """l1: mean |output|, l2: RMS of output, saliency: |Σ output·∂loss/∂output| (first-order
    Taylor estimate of the loss change when the group is removed), averaged over the (x, y)
    `batches` (of every process, under torch.distributed). A head's output is its attention
    output (the hd features it feeds to proj); a neuron's output is its activation (what fc2
    reads)."""
    L, H, hd, D, M = dims(model)
    device = next(model.parameters()).device
    heads = torch.zeros(L, H, device=device)
    neurons = torch.zeros(L, M, device=device)
    modules = {id(b.attn): (l, "attn") for l, b in enumerate(model.blocks)}
    modules.update({id(b.mlp): (l, "mlp") for l, b in enumerate(model.blocks)})

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
        else:  # l1: mean |output|; l2: mean square now, sqrt at the end
            target.index_add_(0, index, (x.abs() if criterion == "l1" else x.square()).mean((0, 1, 3)))

    was_training = model.training
    model.eval()
    _observe(model, observe)
    n = torch.zeros((), device=device)
    try:
        for x, y in batches:
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
    if dist.is_available() and dist.is_initialized():
        for t in (heads, neurons, n):
            dist.all_reduce(t)
    if n == 0:
        raise ConfigError(f"select: criterion={criterion!r} got no batches")
    heads, neurons = heads / n, neurons / n
    if criterion == "l2":
        heads, neurons = heads.sqrt(), neurons.sqrt()
    return heads.cpu(), neurons.cpu()


def _observe(model, observer):
    for block in model.blocks:
        block.attn.observe(observer)
        block.mlp.observe(observer)


def importance(model, structure: Structure, criterion: str, batches=None, keep: float = 1.0, seed: int = 0):
    """Scores ([L, H], [L, M]) of every group; dead groups get -inf. batches: (x, y) for the
    activation criteria; keep: remain's share of the weights; seed: random's."""
    L, H, _, _, M = dims(model)
    if criterion == "magnitude":
        heads, neurons = magnitude_scores(model)
    elif criterion == "remain":
        heads, neurons = remain_scores(model, keep)
    elif criterion == "random":
        g = torch.Generator().manual_seed(seed)
        heads, neurons = torch.rand(L, H, generator=g), torch.rand(L, M, generator=g)
    else:
        heads, neurons = activation_scores(model, batches, criterion)
    heads = heads.masked_fill(~structure.heads, -math.inf)
    neurons = neurons.masked_fill(~structure.neurons, -math.inf)
    return heads, neurons


def keep_set(scores: torch.Tensor, alive: torch.Tensor, keep: float, sorting: str, min_keep: int,
             round_to: int = 1) -> torch.Tensor:
    """Bool keep mask [L, G]: the best `keep` fraction of the groups, ranked across all layers
    (global) or inside each layer (layerwise); every layer keeps >= min_keep groups; only
    alive groups are kept (never more than are alive); with round_to > 1, each layer's count
    rounded (round_widths)."""
    L, G = scores.shape
    if keep >= 1.0:
        return alive.clone()
    # Stable ranking: ties break by position, so the selection is deterministic.
    order_in_layer = torch.sort(scores, dim=1, descending=True, stable=True).indices
    if sorting == "layerwise":
        n = min(max(min_keep, round(keep * G)), G)
        kept = torch.zeros(L, G, dtype=torch.bool)
        kept.scatter_(1, order_in_layer[:, :n], True)
    else:
        n = min(max(L * min_keep, round(keep * L * G)), int(alive.sum()))
        kept = torch.zeros(L, G, dtype=torch.bool)
        kept.scatter_(1, order_in_layer[:, :min_keep], True)  # each layer's best min_keep first
        rest = scores.masked_fill(kept, -math.inf).flatten()
        extra = n - int(kept.sum())
        if extra > 0:
            kept.view(-1)[torch.sort(rest, descending=True, stable=True).indices[:extra]] = True
    kept &= alive
    return kept if round_to == 1 else round_widths(kept.sum(1), order_in_layer, alive, round_to, min_keep)


def round_widths(counts: torch.Tensor, order_in_layer: torch.Tensor, alive: torch.Tensor, n: int,
                 min_keep: int) -> torch.Tensor:
    """Keep mask [L, G] whose layer l keeps the multiple of n nearest counts[l] (a tie rounds
    up), at least min_keep rounded up to n, at most the largest multiple of n alive in it (all
    it has alive when that is fewer than n): its best groups by `order_in_layer`. So a layer
    keeps within n of counts[l] (within n/2 unless min_keep or its alive groups decide)."""
    widths = torch.div(counts + n // 2, n, rounding_mode="floor") * n
    widths = widths.clamp(min=-(-min_keep // n) * n)
    have = alive.sum(1)
    widths = torch.minimum(widths, torch.where(have >= n, have // n * n, have))
    rank = torch.empty_like(order_in_layer)  # rank[l, g]: g's place in its layer's order
    rank.scatter_(1, order_in_layer, torch.arange(alive.shape[1]).expand_as(order_in_layer))
    return (rank < widths[:, None]) & alive


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
