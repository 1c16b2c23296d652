"""One optimisation step, evaluation, and the optimizer and LR schedule of a state."""
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from vitprune.config import Config
from vitprune.data.core import LoopData


def make_optimizer(cfg: Config, model, steps: int, device, epochs: int = None, constant_lr: float = None):
    """Optimizer and per-step LR schedule of one state (every state starts them afresh) of
    `epochs` epochs (default --epochs) and `steps` steps; `constant_lr`: every step at that
    learning rate instead of --lr_schedule (--retrain_lr)."""
    epochs = epochs or cfg.epochs
    decay, no_decay, skip = [], [], model.no_weight_decay()  # timm's: embeddings and tokens
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and name not in skip else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = {"fused": True} if device.type == "cuda" else {}
    lr = cfg.lr if constant_lr is None else constant_lr  # the constant itself: no base × factor rounding
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, **fused)
    else:
        opt = torch.optim.AdamW(groups, lr=lr, **fused)
    if constant_lr is not None:
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(cfg, step, steps, epochs))


def lr_factor(cfg: Config, step: int, steps: int, epochs: int) -> float:
    """--lr_schedule's multiple of --lr at step `step` (0-based) of a state of `epochs` epochs
    and `steps` steps, warm-up included."""
    per_epoch = steps // epochs
    warmup = cfg.warmup_epochs * per_epoch
    if step < warmup:
        return (step + 1) / warmup
    if cfg.lr_schedule == "multistep":  # x0.1 at 50% and 75% of the state's epochs
        epoch = step // per_epoch
        return 0.1 ** ((epoch >= epochs * 0.5) + (epoch >= epochs * 0.75))
    if cfg.lr_schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
    return 1.0


def state0_last_lr(cfg: Config, steps_per_epoch: int) -> float:
    """The learning rate of State 0's last step (--retrain_lr=final)."""
    steps = steps_per_epoch * cfg.epochs
    return cfg.lr * lr_factor(cfg, steps - 1, steps, cfg.epochs)


def train_step(forward, opt, sched, x, y, step: int, autocast, label_smoothing=0.0, rsst=None, loss_fn=None):
    """One optimisation step; returns (loss, logits) as device tensors (no host sync).
    loss_fn(logits, x, y): the loss (distill.training_loss); default: cross-entropy. RSST's
    penalty acts around the optimizer step (methods.RsstRegularizer)."""
    with autocast():
        logits = forward(x)
        loss = loss_fn(logits, x, y) if loss_fn else F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if rsst:
        rsst.before_step(step)
    lr = opt.param_groups[0]["lr"]  # the lr of this step (the schedule moves after it)
    opt.step()
    if rsst:
        rsst.after_step(step, lr)
    sched.step()
    return loss.detach(), logits.detach()


@torch.inference_mode()
def evaluate(model, data: LoopData, split: str, autocast, rank: int = 0, world: int = 1) -> float:
    """Top-1 accuracy (%) on a split in large batches; each process takes its share; one host sync."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=next(model.parameters()).device)
    for xb, yb in data.batches(split, rank=rank, world=world):
        with autocast():
            correct += (model(xb).argmax(1) == yb).sum()
    if world > 1:
        dist.all_reduce(correct)
    model.train(was_training)
    return 100.0 * correct.item() / len(getattr(data, f"{split}_y"))
