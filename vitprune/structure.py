"""Prunable groups (attention heads, MLP neurons), masks, and counts of the alive network:
its parameters and FLOPs, a training step's FLOPs included.

head h of block l:   rows j·H·hd + h·hd + [0, hd) of attn.qkv for q, k, v (j = 0, 1, 2),
                     their bias entries, and columns h·hd + [0, hd) of attn.proj;
neuron n of block l: row n of mlp.fc1, bias n of mlp.fc1, column n of mlp.fc2.
Everything else (patch/position embedding, norms, proj/fc2 biases, classifier) is never
pruned. A pruned group is exactly zero; parameter shapes never change.
"""
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from vitprune.errors import ConfigError
from vitprune.kernels import PrunableParams

PRUNABLE_WEIGHTS = ("attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight")


@dataclass
class Structure:
    """Which groups are alive. heads [L, H] and neurons [L, M] are bool CPU tensors;
    elements maps 'blocks.{l}.{PRUNABLE_WEIGHTS}' to a bool mask (unstructured pruning only)."""
    heads: torch.Tensor
    neurons: torch.Tensor
    elements: Optional[Dict[str, torch.Tensor]] = None

    @classmethod
    def full(cls, model) -> "Structure":
        L, H, _, _, M = dims(model)
        return cls(torch.ones(L, H, dtype=torch.bool), torch.ones(L, M, dtype=torch.bool))

    @classmethod
    def live(cls, model) -> "Structure":
        """What the model's forward computes now (its last apply_structure / set_live)."""
        if not hasattr(model.blocks[0].attn, "live_heads"):
            raise ConfigError("the model's heads and neurons are not prunable: call vitprune.prunable(model) first")
        L, H, _, _, M = dims(model)
        heads, neurons = torch.zeros(L, H, dtype=torch.bool), torch.zeros(L, M, dtype=torch.bool)
        masks = {}
        for l, b in enumerate(model.blocks):
            heads[l, b.attn.live_heads().cpu()] = True
            neurons[l, b.mlp.live_neurons().cpu()] = True
            for name, m in zip(PRUNABLE_WEIGHTS, (b.attn.qkv_mask, b.attn.proj_mask, b.mlp.fc1_mask, b.mlp.fc2_mask)):
                if m is not None:
                    masks[f"blocks.{l}.{name}"] = m.cpu()
        return cls(heads, neurons, masks or None)

    def state_dict(self) -> dict:
        return {"heads": self.heads, "neurons": self.neurons, "elements": self.elements}

    @classmethod
    def from_state_dict(cls, d: dict) -> "Structure":
        return cls(d["heads"].bool(), d["neurons"].bool(), d.get("elements"))


def dims(model):
    """(depth L, heads H, head_dim hd, embed dim D, MLP width M)."""
    attn = model.blocks[0].attn
    return (len(model.blocks), attn.num_heads, attn.head_dim, model.embed_dim,
            model.blocks[0].mlp.fc1.out_features)


def prunable_params(model) -> PrunableParams:
    """The tensors of every block's prunable groups, in the layout the kernels expect."""
    b = model.blocks
    return PrunableParams([x.attn.qkv.weight for x in b], [x.attn.qkv.bias for x in b],
                          [x.attn.proj.weight for x in b], [x.mlp.fc1.weight for x in b],
                          [x.mlp.fc1.bias for x in b], [x.mlp.fc2.weight for x in b])


def head_rows(live_heads: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """qkv row indices of the given heads, ordered (q, k, v) × head × dim as timm reshapes them."""
    dim = torch.arange(head_dim, device=live_heads.device)
    cols = (live_heads[:, None] * head_dim + dim).flatten()
    return torch.cat([j * num_heads * head_dim + cols for j in range(3)])


def head_cols(live_heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """proj column indices read from the given heads."""
    dim = torch.arange(head_dim, device=live_heads.device)
    return (live_heads[:, None] * head_dim + dim).flatten()


@torch.no_grad()
def zero_dead(model, structure: Structure, of=lambda p: p) -> None:
    """Set every weight and bias entry of a dead group (and every masked element) to zero:
    in the parameters, or in `of(parameter)`, a tensor shaped like it (an optimizer's state;
    None skips the parameter)."""
    L, H, hd, D, M = dims(model)
    device = model.blocks[0].attn.qkv.weight.device
    for l, block in enumerate(model.blocks):
        attn, mlp = block.attn, block.mlp
        dead_heads = (~structure.heads[l]).nonzero().flatten()
        rows, cols = head_rows(dead_heads, H, hd).to(device), head_cols(dead_heads, hd).to(device)
        dead = (~structure.neurons[l]).nonzero().flatten().to(device)
        for param, dim, index in ((attn.qkv.weight, 0, rows), (attn.qkv.bias, 0, rows), (attn.proj.weight, 1, cols),
                                  (mlp.fc1.weight, 0, dead), (mlp.fc1.bias, 0, dead), (mlp.fc2.weight, 1, dead)):
            t = of(param)
            if t is not None:
                t.index_fill_(dim, index, 0)
        if structure.elements is not None:
            for name in PRUNABLE_WEIGHTS:
                t = of(block.get_parameter(name))
                if t is not None:
                    t.mul_(structure.elements[f"blocks.{l}.{name}"].to(device))


def set_live(model, structure: Structure) -> None:
    """Make the forward compute only the groups alive in `structure` (and apply its element
    masks). Weights are not touched: RSST evaluates its pruned network this way while the
    targets still hold weights."""
    for l, block in enumerate(model.blocks):
        masks = [None if structure.elements is None else structure.elements[f"blocks.{l}.{name}"]
                 for name in PRUNABLE_WEIGHTS]
        block.attn.set_live(structure.heads[l], *masks[:2])
        block.mlp.set_live(structure.neurons[l], *masks[2:])


def apply_structure(model, structure: Structure, optimizer=None) -> None:
    """Prune to `structure`: dead groups become zero and are skipped by the forward; with the
    `optimizer` that trains the model, their moments become zero too (vitprune.apply)."""
    zero_dead(model, structure)
    set_live(model, structure)
    if optimizer is not None:
        zero_dead_moments(model, structure, optimizer)


def group_sizes(model):
    """Parameters per head and per neuron (weights + bias entries)."""
    _, _, hd, D, _ = dims(model)
    return 3 * hd * D + 3 * hd + hd * D, 2 * D + 1


def count(model, structure: Structure) -> dict:
    """Alive parameters, groups and forward FLOPs per image of the network `structure` describes."""
    L, H, hd, D, M = dims(model)
    total = sum(p.numel() for p in model.parameters())
    head_size, neuron_size = group_sizes(model)
    heads_alive = int(structure.heads.sum())
    neurons_alive = int(structure.neurons.sum())
    attn_alive = heads_alive * head_size
    mlp_alive = neurons_alive * neuron_size
    fixed = total - L * H * head_size - L * M * neuron_size
    if structure.elements is not None:
        # Unstructured: count surviving weight elements; bias entries stay.
        pruned = sum(int((~m).sum()) for k, m in structure.elements.items() if "attn" in k)
        attn_alive -= pruned
        mlp_alive -= sum(int((~m).sum()) for k, m in structure.elements.items() if "mlp" in k)
    tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    patch_flops = 2 * model.patch_embed.num_patches * model.patch_embed.proj.weight[0].numel() * D
    head_flops = 2 * D * model.num_classes
    flops_alive = patch_flops + head_flops
    flops_total = patch_flops + head_flops
    for l in range(L):
        a, n = int(structure.heads[l].sum()) * hd, int(structure.neurons[l].sum())
        # qkv + proj + q·kᵀ + attn·v over alive heads; fc1 + fc2 over alive neurons.
        flops_alive += 2 * tokens * (4 * a * D + 2 * tokens * a + 2 * n * D)
        flops_total += 2 * tokens * (4 * H * hd * D + 2 * tokens * H * hd + 2 * M * D)
    return {
        "params_alive": fixed + attn_alive + mlp_alive, "params_total": total,
        "attn_params_alive": attn_alive, "mlp_params_alive": mlp_alive,
        "heads_alive": heads_alive, "heads_total": L * H,
        "neurons_alive": neurons_alive, "neurons_total": L * M,
        "flops_alive": flops_alive, "flops_total": flops_total,
    }


def widths(structure: Structure) -> dict:
    """Per layer, the heads and MLP neurons alive, and the fraction of each kind removed (as
    --head_ratio / --mlp_ratio count it): the state record's and the model card's."""
    return {"heads_per_layer": structure.heads.sum(1).tolist(), "mlp_widths": structure.neurons.sum(1).tolist(),
            "head_ratio_achieved": 1 - int(structure.heads.sum()) / structure.heads.numel(),
            "mlp_ratio_achieved": 1 - int(structure.neurons.sum()) / structure.neurons.numel()}


def step_flops(model, alive: Structure, teacher_flops: int = 0) -> int:
    """Training FLOPs per image of one step: forward + backward (2× the forward) of the
    structure the step computes (RSST: with its targets; imp: the dense shape, as its element
    masks save no FLOPs here), plus a teacher's forward when distilling."""
    return 3 * count(model, Structure(alive.heads, alive.neurons))["flops_alive"] + teacher_flops


def zero_dead_moments(model, structure: Structure, opt) -> None:
    """A dead group's optimizer state is zero too (momentum, Adam's moments), so that a
    restored optimizer cannot move it away from zero."""
    for key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
        zero_dead(model, structure, of=lambda p: opt.state.get(p, {}).get(key))
