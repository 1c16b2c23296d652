"""What each method does between states and during a state.

refill: at the transition, zero the groups outside the keep set K on the rewound weights.
rsst:   at the transition nothing is removed; the targets T (alive groups outside K) are
        pulled to zero during the whole state by a penalty whose coefficient λ(p) grows
        with the state's progress p, then hard-pruned at the end of the state.
imp:    unstructured global magnitude pruning with element masks (the classic ticket).
dense:  no pruning (the noise floor of the loop).
"""
import math
from typing import NamedTuple, Optional

import torch

from vitprune import select
from vitprune.kernels import PrunableParams
from vitprune.kernels.reference import group_sq_norms
from vitprune.structure import Structure, apply_structure, dims, group_sizes, prunable_params


def reg_lambda(schedule: str, p: float, g: float, k: float) -> float:
    """RSST coefficient at progress p ∈ (0, 1] of the state; λ(1) = g for every schedule."""
    if schedule == "x":
        return g * p
    if schedule == "x^2":
        return g * p ** 2
    if schedule == "x^3":
        return g * p ** 3
    if schedule in ("exp", "exp_custom"):
        return g * (math.exp(p) - 1) / (math.e - 1)
    if schedule == "exp_custom_exponents":
        return g * (math.exp(p ** k) - 1) / (math.e - 1)
    raise ValueError(f"unknown reg_schedule {schedule!r}")


class Transition(NamedTuple):
    """What a state trains: the structure alive while it trains, the structure alive after
    it, and RSST's penalty on the difference (None for the other methods)."""
    train: Structure
    end: Structure
    regularizer: Optional["RsstRegularizer"]


def transition(cfg, model, structure: Structure, data, state: int, rewind_to: Optional[dict],
               steps_in_state: int, group_reg) -> Transition:
    """Between states: select the structure of `state` (>= 1) from the trained weights of the
    previous one, rewind to `rewind_to` (None: keep the trained weights), prune."""
    train, end = select_structure(cfg, model, structure, data, state)
    if rewind_to is not None:
        model.load_state_dict(rewind_to)
    apply_structure(model, train)
    return Transition(train, end, regularizer(cfg, model, train, end, steps_in_state, group_reg))


def select_structure(cfg, model, structure: Structure, data, state: int):
    """(alive while `state` trains, alive after it): they differ only for RSST, whose targets
    are the difference."""
    if cfg.method == "dense":
        return structure, structure
    if cfg.method == "imp":
        keep = select.keep_fraction(cfg.schedule, state, cfg.states, cfg.ratio)
        new = Structure(structure.heads, structure.neurons, select.select_elements(model, structure, keep))
        return new, new
    keep_h = select.keep_fraction(cfg.schedule, state, cfg.states, cfg.head_prune)
    keep_n = select.keep_fraction(cfg.schedule, state, cfg.states, cfg.mlp_prune)
    head_size, neuron_size = group_sizes(model)
    L, H, _, _, M = dims(model)
    # remain: the unstructured prune keeps the same share of the prunable weights.
    keep_w = (keep_h * L * H * head_size + keep_n * L * M * neuron_size) / (L * H * head_size + L * M * neuron_size)
    heads, neurons = select.importance(model, structure, cfg.criterion, data, keep_w, cfg.calib_batches,
                                       cfg.batch_size, cfg.seed, state)
    kept = Structure(select.select(heads, structure.heads, keep_h, cfg.sorting, cfg.min_keep),
                     select.select(neurons, structure.neurons, keep_n, cfg.sorting, cfg.min_keep))
    return (kept, kept) if cfg.method == "refill" else (structure, kept)


def regularizer(cfg, model, train: Structure, end: Structure, steps_in_state: int, group_reg,
                start_norm: float = None) -> Optional["RsstRegularizer"]:
    """RSST's penalty on the groups alive in `train` but not in `end` (None for other methods
    or without targets). start_norm: the targets' norm at the start of the state, when
    resuming in its middle."""
    heads, neurons = train.heads & ~end.heads, train.neurons & ~end.neurons
    if cfg.method != "rsst" or not (heads.any() or neurons.any()):
        return None
    return RsstRegularizer(model, heads, neurons, steps_in_state, group_reg, schedule=cfg.reg_schedule,
                           g=cfg.reg_granularity_prune, k=cfg.exponents, kind=cfg.reg_kind,
                           decoupled_lr=cfg.lr if cfg.optimizer == "adamw" else None, start_norm=start_norm)


class RsstRegularizer:
    """The penalty of one RSST state, applied every step in one vectorised pass.

    l2: grad += λ·w on the targets; group_lasso: grad += λ·w/‖w_g‖. With AdamW it is
    decoupled (w -= lr·λ·w after the step), so Adam's normalisation cannot cancel it; there
    lr is the state's base --lr, not the scheduled one: λ(p) alone sets how the pull grows,
    and a cosine schedule cannot switch it off right when it must be strongest.
    """

    def __init__(self, model, head_targets, neuron_targets, steps_in_state: int, group_reg, *, schedule: str,
                 g: float, k: float, kind: str, decoupled_lr: Optional[float], start_norm: float = None):
        device = model.blocks[0].attn.qkv.weight.device
        self.params = prunable_params(model)
        self.heads = head_targets.to(device)
        self.neurons = neuron_targets.to(device)
        self.steps = steps_in_state
        self.group_reg = group_reg
        self.schedule, self.g, self.k, self.kind = schedule, g, k, kind
        self.decoupled_lr = decoupled_lr
        self.start_norm = float(self.target_norm()) if start_norm is None else start_norm

    def lam(self, step: int) -> float:
        """λ after `step` steps of the state (1-based): p = step / steps_in_state."""
        return reg_lambda(self.schedule, min(step / self.steps, 1.0), self.g, self.k)

    def before_step(self, step: int):
        """Coupled penalty: add it to the gradients (SGD)."""
        if self.decoupled_lr is None:
            grads = PrunableParams(*([p.grad for p in ps] for ps in self.params))
            self.group_reg(self.params, grads, self.heads, self.neurons, self.lam(step), self.kind)

    @torch.no_grad()
    def after_step(self, step: int):
        """Decoupled penalty: shrink the targets' weights (AdamW)."""
        if self.decoupled_lr is not None:
            self.group_reg(self.params, self.params, self.heads, self.neurons, -self.decoupled_lr * self.lam(step),
                           self.kind)

    @torch.no_grad()
    def target_norm(self) -> torch.Tensor:
        """‖w_T‖ over all target groups (a device scalar: read it once per epoch)."""
        heads_sq, neurons_sq = group_sq_norms(self.params, self.heads.shape[1])
        return ((heads_sq * self.heads).sum() + (neurons_sq * self.neurons).sum()).sqrt()

    def norm_ratio(self) -> float:
        return float(self.target_norm()) / self.start_norm if self.start_norm > 0 else 0.0
