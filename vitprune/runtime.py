"""A run's fixed parts, built once at its start by `setup`: processes and device, kernels,
data, model, folder and log (`Run`). Everything that can fail on bad input fails in setup,
before the run folder is touched."""
import contextlib
import dataclasses
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from vitprune import kernels, log
from vitprune.config import Config
from vitprune.data import load_data
from vitprune.data.augment import Mixer
from vitprune.data.core import LoopData, steps_per_epoch
from vitprune.devices import autocast, init_distributed, use_bf16
from vitprune.distill import Teacher, load_teacher
from vitprune.errors import ConfigError
from vitprune.model import build_model, fresh_weights, set_kernels
from vitprune.runfolder import RunFolder, claim, run_name
from vitprune.step import evaluate, make_optimizer, state0_last_lr
from vitprune.structure import Structure, count, set_live, step_flops
from vitprune.zoo import preprocessing


@dataclasses.dataclass
class Run:
    """What stays fixed for the whole run: configuration, processes, data, model, files."""
    cfg: Config
    rank: int
    world: int
    device: torch.device
    data: LoopData
    steps: int                   # optimisation steps per epoch
    model: torch.nn.Module
    forward: Callable            # the model as the training step calls it (DDP, compiled)
    autocast: Callable
    group_reg: Callable          # RSST's kernel
    run_dir: Path
    log: Optional[log.RunLog]    # only the first process writes
    masked_linear: Callable = None
    mixer: Optional[Mixer] = None       # --aug=finetune: mixup/cutmix and soft targets
    teacher: Optional[Teacher] = None   # --distill: loaded when the first state >= 1 trains
    preprocessing: dict = None   # what the model is fed: img_size, mean, std, interpolation
    # What the run found at start-up, in summary.json and every state record: what --precision,
    # --device and --kernels resolved to, and which images it validates and tests on.
    facts: dict = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def first_epoch(self, state: int) -> int:
        """The epoch a state starts at: K under --rewind=epoch:K (late rewinding continues the
        schedule of state 0 from epoch K), else 0."""
        return (self.cfg.rewind_epoch or 0) if state > 0 else 0

    def epochs_of(self, state: int) -> int:
        """The epochs of a state's schedule: --epochs, or --pruned_epochs for states >= 1."""
        return (self.cfg.pruned_epochs or self.cfg.epochs) if state > 0 else self.cfg.epochs

    def epochs_before(self, state: int) -> int:
        """global_epoch of the state's epoch 0."""
        return sum(self.epochs_of(s) for s in range(state))

    def steps_in_state(self, state: int) -> int:
        return (self.epochs_of(state) - self.first_epoch(state)) * self.steps

    @property
    def retrain_lr(self) -> Optional[float]:
        """The constant learning rate of states >= 1 (--retrain_lr), None: they follow --lr_schedule."""
        if self.cfg.retrain_lr is None:
            return None
        return state0_last_lr(self.cfg, self.steps) if self.cfg.retrain_lr == "final" else float(self.cfg.retrain_lr)

    def optimizer(self, state: int):
        """A state's new optimizer and LR schedule (over its epochs; constant under --retrain_lr)."""
        epochs = self.epochs_of(state)
        return make_optimizer(self.cfg, self.model, self.steps * epochs, self.device, epochs,
                              self.retrain_lr if state > 0 else None)

    def fresh_init(self, state: int) -> dict:
        """--rewind=random: the weights state `state` starts from (model.fresh_weights)."""
        c = self.cfg
        return fresh_weights(c.model, self.data.num_classes, c.img_size, c.patch_size, c.seed, state)

    def say(self, *args, **kwargs):
        if self.main:
            print(*args, **kwargs)

    def evaluate(self, split: str) -> float:
        return evaluate(self.model, self.data, split, self.autocast, self.rank, self.world)

    @contextlib.contextmanager
    def live(self, structure: Structure, restore: Structure):
        """The forward computes the network `structure` leaves alive (weights untouched) inside
        the block, and `restore` (the live one) again after it."""
        set_live(self.model, structure)
        try:
            yield
        finally:
            set_live(self.model, restore)

    def teacher_of(self, state: int) -> Optional[Teacher]:
        """The teacher of a state (--distill; states >= 1 only), loaded once."""
        if self.cfg.distill == "none" or state == 0:
            return None
        if self.teacher is None:
            self.teacher = load_teacher(self.cfg, self.run_dir, self.data.num_classes, self.device,
                                        self.masked_linear)
        return self.teacher

    def teacher_flops(self, state: int) -> int:
        teacher = self.teacher_of(state)
        return teacher.flops if teacher else 0

    def epoch_flops(self, alive, state: int) -> int:
        """Training FLOPs of one epoch of state `state` with the groups `alive`, teacher included."""
        return self.steps * self.cfg.batch_size * step_flops(self.model, alive, self.teacher_flops(state))


def setup(cfg: Config, folder: RunFolder = None) -> Run:
    """The run's fixed parts, in its folder (`folder`: runfolder.claim's, else claimed here).
    Everything that can fail on bad input happens here, before the folder is touched."""
    folder = folder or claim(cfg)
    rank, world, device = init_distributed(cfg)
    bf16 = use_bf16(cfg.precision, device)
    try:  # the backend that will run: Triton only if its self-check passes in this precision
        backend = kernels.resolve_backend(cfg.kernels, device, torch.bfloat16 if bf16 else torch.float32)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    masked_linear, group_reg = kernels.get_ops(backend)
    prep = {"img_size": cfg.img_size, **preprocessing(cfg.model, cfg.pretrained)}
    data = load_data(cfg, device, world, prep)
    steps = steps_per_epoch(data, cfg.batch_size)
    if steps == 0:
        raise ConfigError(f"--batch_size: {cfg.batch_size} is larger than the training set "
                          f"({len(data.train_y)} images)")
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.num_classes, cfg.img_size, cfg.patch_size, cfg.pretrained)
    if cfg.pretrained and rank == 0:
        print(f"--pretrained {cfg.pretrained}: loaded by timm into {model.pretrained_cfg.get('architecture')} "
              f"({cfg.img_size} px, patch {cfg.patch_size}, {data.num_classes} classes), input mean "
              f"{prep['mean']} std {prep['std']}")
    model.to(device)
    set_kernels(model, masked_linear)
    forward = model
    if world > 1:
        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        # Index tensors change shape when the structure changes: one recompile per state.
        forward = torch.compile(forward)
    if rank == 0:
        folder.prepare()
    if world > 1:
        dist.barrier()  # the folder exists (or the run stopped) before any process reads it
    facts = {"precision": "bf16" if bf16 else "fp32", "device_type": device.type, "kernels_backend": backend,
             "split_fingerprint": data.split_fingerprint}
    run_log = log.RunLog(folder.path, cfg.to_dict(), cfg.wandb,
                         runtime={**facts, "preprocessing": prep}) if rank == 0 else None
    mixer = Mixer(cfg.mixup_alpha, cfg.cutmix_alpha, cfg.label_smoothing, data.num_classes) \
        if cfg.aug == "finetune" else None
    if mixer:  # --aug=finetune: the data's random-resized crop, and soft targets
        data.crop = ((cfg.crop_scale_min, 1.0), (1 / cfg.crop_ratio_max, cfg.crop_ratio_max))
    r = Run(cfg, rank, world, device, data, steps, model, forward, autocast(bf16, device), group_reg, folder.path,
            run_log, masked_linear, mixer, preprocessing=prep, facts=facts)
    r.say(f"{run_name(cfg)}: {cfg.method} on {cfg.dataset}, {cfg.model} "
          f"({count(model, Structure.full(model))['params_total'] / 1e6:.2f}M params), {cfg.states} states × "
          f"{cfg.epochs} epochs" + (f" (states >= 1: {cfg.pruned_epochs})" if cfg.pruned_epochs else "") +
          (f", states >= 1 at a constant lr {r.retrain_lr:g}" if cfg.retrain_lr else "") +
          f", {steps} steps/epoch, {cfg.img_size} px / patch {cfg.patch_size}, "
          f"{device} {'bf16' if bf16 else 'fp32'}, kernels={backend}"
          + (f", {world} processes" if world > 1 else ""))
    return r
