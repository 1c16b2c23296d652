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

from vitprune.config import check_value
from vitprune.errors import ConfigError
from vitprune.importance import ACTIVATION_CRITERIA, calibration_batches, keep_elements, keep_fraction, \
    pruned_fraction, select
from vitprune.kernels import PrunableParams, reference
from vitprune.kernels.reference import group_sq_norms
from vitprune.structure import Structure, apply_structure, prunable_params


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
    """What a state trains: `alive` while it trains, `keep` alive after it, and RSST's
    penalty on the difference (None for the other methods)."""
    alive: Structure
    keep: Structure
    regularizer: Optional["RsstRegularizer"]


def transition(cfg, model, alive: Structure, data, state: int, rewind_to: Optional[dict],
               steps_in_state: int, group_reg) -> Transition:
    """Between states: select the structures of `state` (>= 1) from the trained weights of the
    previous one (`alive`: what it left alive), rewind to `rewind_to` (None: keep the trained
    weights), prune."""
    alive, keep = select_structure(cfg, model, alive, data, state)
    if rewind_to is not None:
        model.load_state_dict(rewind_to)
    apply_structure(model, alive)
    return Transition(alive, keep, regularizer(cfg, model, alive, keep, steps_in_state, group_reg))


def select_structure(cfg, model, structure: Structure, data, state: int):
    """(alive while `state` trains, alive after it: its keep set): they differ only for RSST,
    whose targets are the difference. `structure`: what the model computes now."""
    if cfg.method == "dense":
        return structure, structure
    if cfg.method == "imp":
        keep = keep_fraction(cfg.schedule, state, cfg.states, cfg.ratio)
        new = Structure(structure.heads, structure.neurons, keep_elements(model, structure, keep))
        return new, new
    seed = cfg.seed * 7919 + state  # the random criterion's and the calibration batches'
    batches = calibration_batches(data, cfg.calib_batches, cfg.batch_size, seed) \
        if cfg.criterion in ACTIVATION_CRITERIA else None
    kept = select(model, head_ratio=pruned_fraction(cfg.schedule, state, cfg.states, cfg.head_prune),
                  mlp_ratio=pruned_fraction(cfg.schedule, state, cfg.states, cfg.mlp_prune), min_keep=cfg.min_keep,
                  round_to=cfg.round_to, criterion=cfg.criterion, sorting=cfg.sorting, batches=batches, seed=seed)
    return (kept, kept) if cfg.method == "refill" else (structure, kept)


def regularizer(cfg, model, alive: Structure, keep: Structure, steps_in_state: int, group_reg,
                start_norms=None) -> Optional["RsstRegularizer"]:
    """RSST's penalty on the groups in `alive` but not in `keep` (None for other methods or
    without targets). start_norms: the groups' norms at the start of the state ([L, H],
    [L, M]), when resuming in its middle."""
    if cfg.method != "rsst" or not ((alive.heads & ~keep.heads).any() or (alive.neurons & ~keep.neurons).any()):
        return None
    # --reg_reach: the penalty acts over the first reach·steps steps, then the targets are pruned
    steps = max(1, round(cfg.reg_reach * steps_in_state))
    return RsstRegularizer(model, keep, steps, reg_formula=cfg.reg_formula, reg_schedule=cfg.reg_schedule,
                           exponents=cfg.exponents, reg_kind=cfg.reg_kind, reg_residual=cfg.reg_residual,
                           reg_granularity_prune=cfg.reg_granularity_prune, optimizer=cfg.optimizer, lr=cfg.lr,
                           group_reg=group_reg, start_norms=start_norms)


def residual_coefficient(shape, residual: float) -> float:
    """c such that Π_t (1 − c·shape_t) = residual: the per-step shrink w ← w·(1 − c·shape_t)
    then leaves `residual` of a group's norm after the state. shape_t ∈ [0, 1], last = 1."""
    if residual >= 1:
        return 0.0
    shape = torch.as_tensor(shape, dtype=torch.float64)
    lo, hi = 0.0, 1.0  # the product falls from 1 (c = 0) to 0 (c = 1): bisect
    for _ in range(60):
        c = (lo + hi) / 2
        if float(torch.log1p(-c * shape).sum()) > math.log(residual):
            lo = c
        else:
            hi = c
    return lo


class RsstRegularizer:
    """The penalty of one RSST state on its target groups, one vectorised pass per step; the
    loop's and vitprune.RsstRegularizer. The targets are the groups the model computes now
    (structure.apply_structure) outside `keep` (importance.select's). Around every step:

        loss.backward(); rsst.before_step(step); optimizer.step(); rsst.after_step(step, lr)

    (step: 1, 2, ... within the state; lr: the step's scheduled learning rate), then, after
    step `steps`, rsst.prune(optimizer) removes the targets: the hard prune. The keyword
    arguments are the RSST flags of the same names, with their defaults (docs/flags.md#rsst).

    reg_formula="residual" (the default): the strength is stated as the fraction of its norm a
    target group keeps at the end of the state if only the penalty acted (`reg_residual`), and
    λ(p) only shapes its growth. The per-step coefficients are solved once, from the state's
    step count, and applied to the weights after the optimizer step, independently of the
    optimizer and its LR schedule:
      l2:          w ← w·(1 − c·s(p))            with Π (1 − c·s(p_t)) = r
      group_lasso: w_g ← w_g·max(0, 1 − a·s(p)·‖w_g⁰‖/‖w_g‖) with a·Σ s(p_t) = 1 − r
    (s = λ/g, s(1) = 1; ‖w_g⁰‖ the group's norm at the start of the state). `steps_in_state`:
    the steps the penalty acts over (the state's, or --reg_reach of them: then the targets are
    hard-pruned and the state goes on without them).

    reg_formula="seed" reproduces the seed's coupled formula with g = reg_granularity_prune:
      l2 + SGD:    grad += λ(p)·w (scaled by the scheduled lr, amplified by momentum)
      l2 + AdamW:  w −= lr·λ(p)·w after the step (the base lr)
      group_lasso: the proximal step w_g ← w_g·max(0, 1 − lr·λ(p)/‖w_g‖) after the step.
    """

    def __init__(self, model, keep: Structure, steps_in_state: int, *, reg_formula: str = "residual",
                 reg_schedule: str = "exp_custom_exponents", exponents: float = 4.0, reg_kind: str = "l2",
                 reg_residual: float = 1e-3, reg_granularity_prune: float = 1.0, optimizer: str = "sgd",
                 lr: float = 0.01, group_reg=reference.group_reg, start_norms=None):
        flags = dict(reg_formula=reg_formula, reg_schedule=reg_schedule, exponents=exponents, reg_kind=reg_kind,
                     reg_residual=reg_residual, reg_granularity_prune=reg_granularity_prune, optimizer=optimizer, lr=lr)
        for name, value in flags.items():
            check_value(name, value, label=f"RsstRegularizer: {name}")
        if isinstance(steps_in_state, bool) or not isinstance(steps_in_state, int) or steps_in_state < 1:
            raise ConfigError(f"RsstRegularizer: steps_in_state: expected an integer >= 1, got {steps_in_state!r}")
        device = model.blocks[0].attn.qkv.weight.device
        self.model, self.keep, self.params = model, keep, prunable_params(model)
        alive = Structure.live(model)
        self.heads, self.neurons = (alive.heads & ~keep.heads).to(device), (alive.neurons & ~keep.neurons).to(device)
        self.steps, self.group_reg, self.kind = steps_in_state, group_reg, reg_kind
        self.start_norms = self.group_norms() if start_norms is None else tuple(t.to(device) for t in start_norms)
        self.shape = lambda p: reg_lambda(reg_schedule, p, 1.0, exponents)
        shapes = [self.shape(t / steps_in_state) for t in range(1, steps_in_state + 1)]
        seed = reg_formula == "seed"
        self.into_grad = seed and reg_kind == "l2" and optimizer == "sgd"
        self.scale_lr = seed and reg_kind == "group_lasso" and optimizer == "sgd"
        # coef(p) = scale · s(p); what multiplies it per group (1, or the start norm) below
        self.head_w, self.neuron_w = self.heads.float(), self.neurons.float()
        if seed:
            g = reg_granularity_prune
            self.scale = g if self.into_grad or self.scale_lr else lr * g
        elif reg_kind == "l2":
            self.scale = residual_coefficient(shapes, reg_residual)
        else:
            self.scale = (1 - reg_residual) / sum(shapes)
            self.head_w, self.neuron_w = self.head_w * self.start_norms[0], self.neuron_w * self.start_norms[1]

    def coef(self, step: int) -> float:
        """The coefficient of step `step` (1-based within the state): logged as reg_lambda."""
        return self.scale * self.shape(min(step / self.steps, 1.0))

    def before_step(self, step: int):
        """The seed's coupled l2 penalty with SGD: add λ·w to the targets' gradients."""
        if self.into_grad:
            grads = PrunableParams(*([p.grad for p in ps] for ps in self.params))
            self.group_reg(self.params, grads, self.head_w, self.neuron_w, self.coef(step), self.kind)

    @torch.no_grad()
    def after_step(self, step: int, lr: float = None):
        """Every other form: shrink the targets' weights after the optimizer step (`lr`: the
        step's scheduled learning rate, used only by the seed's proximal group lasso with SGD)."""
        if not self.into_grad:
            step_size = self.coef(step) * (lr if self.scale_lr else 1.0)
            self.group_reg(self.params, self.params, self.head_w, self.neuron_w, -step_size, self.kind)

    def prune(self, optimizer=None):
        """The hard prune: the model keeps `keep` (its targets zero and skipped, and their
        moments in `optimizer` zero): structure.apply_structure."""
        apply_structure(self.model, self.keep, optimizer)

    @torch.no_grad()
    def group_norms(self):
        """‖w_g‖ of every head and neuron: ([L, H], [L, M]) device tensors."""
        heads_sq, neurons_sq = group_sq_norms(self.params, self.heads.shape[1])
        return heads_sq.sqrt(), neurons_sq.sqrt()

    def target_norm(self, norms=None) -> torch.Tensor:
        """‖w_T‖ over all target groups (a device scalar: read it once per epoch)."""
        heads, neurons = self.group_norms() if norms is None else norms
        return ((heads.square() * self.heads).sum() + (neurons.square() * self.neurons).sum()).sqrt()

    def norm_ratios(self) -> tuple:
        """(‖w_T‖ now / at the start of the state, the largest ‖w_g‖ now / at the start over the
        target groups g): a few groups the gradient holds up hide in the aggregate. One host sync."""
        norms = self.group_norms()
        start = self.target_norm(self.start_norms)
        largest = [(now / then.clamp_min(1e-30))[targets].max() for now, then, targets in
                   zip(norms, self.start_norms, (self.heads, self.neurons)) if targets.any()]
        agg = torch.where(start > 0, self.target_norm(norms) / start.clamp_min(1e-30), 0.0)
        agg, largest = torch.stack([agg, torch.stack(largest).max()]).tolist()
        return agg, largest
