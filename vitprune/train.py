"""The state loop: train → select structure → rewind → retrain, with exact resume.

    θ0 ← initial (or pretrained) weights: the rewind point
    for state in 0 .. states-1:
        state ≥ 1: select the keep set from the trained weights, rewind, prune (the method's transition)
        train `epochs` (RSST: regularise the targets), finish (RSST: hard-prune the targets)
        evaluate the final, pruned network on val and test; checkpoint; log

Where the loop stands is a `Position`, saved with the model, optimizer, LR schedule and RNG
in checkpoints/last.pt (atomically) at the start of every state and after every epoch; the
data order depends only on (seed, state, epoch). So a killed run resumed with --resume gives
the same numbers as one that was never interrupted.
"""
import contextlib
import copy
import dataclasses
import math
import os
import shlex
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from vitprune import checkpoint, fmt, kernels
from vitprune.config import NOT_ZEROED, Config, ConfigError, check_run_folder
from vitprune.data import LoopData, load_data, steps_per_epoch, train_batches
from vitprune.data.augment import Mixer
from vitprune.distill import Teacher, load_teacher, training_loss
from vitprune.log import RunLog, write_json
from vitprune.methods import RsstRegularizer, Transition, regularizer, transition
from vitprune.model import build_model, set_kernels
from vitprune.structure import Structure, apply_structure, count, set_live, zero_dead
from vitprune.zoo import preprocessing


# ---- the building blocks: device, optimizer, one step, evaluation ---------------------------

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device: {name!r} requested but CUDA is not available; choose from auto, cpu")
    return device


def use_bf16(precision: str, device: torch.device) -> bool:
    """Whether to autocast in bf16 (--precision; 'auto': on CUDA). On CUDA the fp32 matmuls
    and convolutions use TF32 either way."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def make_optimizer(cfg: Config, model, steps: int, device, epochs: int = None):
    """Optimizer and per-step LR schedule of one state (every state starts them afresh) of
    `epochs` epochs (default --epochs) and `steps` steps."""
    epochs = epochs or cfg.epochs
    decay, no_decay, skip = [], [], model.no_weight_decay()  # timm's: embeddings and tokens
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and name not in skip else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = {"fused": True} if device.type == "cuda" else {}
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, **fused)
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr, **fused)
    per_epoch = steps // epochs
    warmup = cfg.warmup_epochs * per_epoch

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        if cfg.lr_schedule == "multistep":  # x0.1 at 50% and 75% of the state's epochs
            epoch = step // per_epoch
            return 0.1 ** ((epoch >= epochs * 0.5) + (epoch >= epochs * 0.75))
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
        return 1.0
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


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


def train_step(forward, opt, sched, x, y, step: int, autocast, label_smoothing=0.0, rsst=None, loss_fn=None):
    """One optimisation step; returns (loss, logits) as device tensors (no host sync).
    loss_fn(logits, x, y): the loss (distill.training_loss); default: cross-entropy."""
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


def init_distributed(cfg: Config):
    """(rank, world, device). Under torchrun (WORLD_SIZE > 1) join the process group: NCCL on
    CUDA (one GPU per process, cuda:LOCAL_RANK), gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, resolve_device(cfg.device)
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if cfg.batch_size % world:
        raise ConfigError(f"--batch_size: {cfg.batch_size} must be divisible by the {world} processes")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


def prepare_run_dir(cfg: Config) -> Path:
    """The run folder: refuse to touch an existing one unless --resume or --overwrite."""
    run_dir = Path(cfg.out_dir) / cfg.run_name
    if cfg.resume:
        if not any((run_dir / "checkpoints").glob("*.pt")):
            raise ConfigError(f"--resume: no checkpoint at {run_dir}/checkpoints/last.pt; "
                              f"start the run without --resume")
        return run_dir
    if run_dir.exists() and any(run_dir.iterdir()):
        check_run_folder(cfg)
        if not cfg.overwrite:
            raise ConfigError(f"--name: run folder {run_dir} already exists; pass --resume to continue it "
                              f"or --overwrite to replace it")
        shutil.rmtree(run_dir)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    return run_dir


def save_torch(obj, path: Path):
    checkpoint.save(obj, path)  # verified, with its checksum beside it


# ---- what a run holds, and where its loop stands ---------------------------------------------

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
    log: Optional[RunLog]        # only the first process writes
    masked_linear: Callable = None
    mixer: Optional[Mixer] = None       # --aug=finetune: mixup/cutmix and soft targets
    teacher: Optional[Teacher] = None   # --distill: loaded when the first state >= 1 trains
    preprocessing: dict = None   # what the model is fed: img_size, mean, std, interpolation

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


@dataclasses.dataclass
class Position:
    """Where the loop stands. With the model, optimizer, schedule and RNG it is last.pt."""
    state: int
    next_epoch: int               # the epoch to train next (from K under --rewind=epoch:K)
    alive: Structure              # alive while the state trains (the forward computes it)
    keep: Structure               # alive after it (RSST: alive minus its targets)
    start_acc: tuple = None       # (val, test) of the state's network before training
    state_time: float = 0.0
    rsst_start_norms: Optional[tuple] = None  # RSST: every group's norm at the start of the state
    history: list = dataclasses.field(default_factory=list)  # the state's epoch records
    step: int = 0                 # steps done in epoch `next_epoch` (an interrupted epoch)
    partial: Optional[tuple] = None  # its (loss · n, correct, images, seconds, lr) so far, all processes
    train_flops: float = 0.0      # training FLOPs of the run up to next_epoch (all processes)
    train_time: float = 0.0       # seconds spent in training steps up to next_epoch, across resumes
    pruned: Optional[dict] = None  # RSST: its hard prune happened (step, accuracy before, targets' norms)

    OLD_KEYS = {"epochs_done": "next_epoch", "structure": "alive"}  # last.pt written before the renames

    def save(self, path: Path, model, opt, sched, cfg: Config):
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields = {k: v.state_dict() if isinstance(v, Structure) else v for k, v in fields.items()}
        save_torch({**fields, "model": model.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "rng": torch.get_rng_state(), "config": cfg.to_dict()}, path)

    @classmethod
    def load(cls, path: Path, model, device):
        """The saved position; loads the model and the RNG. Returns (position, checkpoint)."""
        return cls.from_checkpoint(torch.load(path, map_location=device, weights_only=False), model)

    @classmethod
    def from_checkpoint(cls, ck: dict, model):
        """The position a loaded last.pt (or start_XX.pt) holds; loads the model and the RNG."""
        ck = {cls.OLD_KEYS.get(k, k): v for k, v in ck.items()}
        model.load_state_dict(ck["model"])
        torch.set_rng_state(ck["rng"].cpu())
        fields = {f.name: Structure.from_state_dict(ck[f.name]) if f.type is Structure else ck[f.name]
                  for f in dataclasses.fields(cls) if f.name in ck}  # newer fields: their defaults
        return cls(**fields), ck


class StepTools(NamedTuple):
    """What the steps of one state use: optimizer, LR schedule, RSST's penalty (or None)."""
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    rsst: Optional[RsstRegularizer]


# ---- the loop -------------------------------------------------------------------------------

def run(cfg: Config) -> Path:
    stop = StopRequest()
    with stop.handling_signals():
        r = setup(cfg)
        pos, tools, rewind = resume(r) if cfg.resume else begin(r)
        run_start, epoch_times, first = time.time(), [], pos.state
        try:
            for state in range(first, cfg.states):
                if state > first:  # begin or resume started the first one
                    pos, tools = start_state(r, pos, state, rewind)
                    if stop.requested(0, r.world, r.device):  # arrived during the finish: stop at step 0
                        raise Interrupted()
                for epoch in range(pos.next_epoch, r.epochs_of(state)):
                    record = train_epoch(r, pos, tools, epoch, stop)
                    if state == 0 and cfg.rewind_epoch == epoch + 1:  # late rewinding rewinds to here
                        rewind = save_rewind_point(r, epoch + 1, tools)
                    end_epoch(r, pos, tools, record, epoch_times)
                finish_state(r, pos, tools)
        except Interrupted:
            stop_here(r, pos, tools, stop.signum)
    if r.main:
        r.log.close()
    r.say(f"done in {fmt.clock(time.time() - run_start)}; results in {r.run_dir} (metrics.jsonl, summary.json)")
    if stop.signum is not None:  # arrived after the last step: honoured, though nothing is left to do
        r.say(f"{signal.Signals(stop.signum).name} after the last step: the run had finished; nothing to resume")
        raise SystemExit(128 + stop.signum)
    return r.run_dir


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived: the loop stops at the step boundary where it is raised."""


class StopRequest:
    """SIGINT (Ctrl-C) and SIGTERM ask the loop to stop at the next step boundary, where it
    saves its position; a second signal stops at once (last.pt then holds the last epoch)."""
    CHECK_EVERY = 16  # steps between the processes' agreement on stopping (DDP): one sync each

    def __init__(self):
        self.signum = None

    @contextlib.contextmanager
    def handling_signals(self):
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.signum is not None:
            print(f"\n{signal.Signals(signum).name} again: stopping now; last.pt holds the last finished epoch",
                  file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping at the next step (again to stop at once)",
              file=sys.stderr, flush=True)

    def requested(self, step: int, world: int, device) -> bool:
        """Whether to stop after `step`; every process gives the same answer at the same step."""
        if world == 1:
            return self.signum is not None
        if step % self.CHECK_EVERY:
            return False
        flag = torch.tensor(float(self.signum is not None), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def stop_here(r: Run, pos: Position, tools: StepTools, signum: int):
    """After an interruption: last.pt at this step, summary.json "interrupted", the command
    that resumes, and the exit code of the signal (130 for SIGINT, 143 for SIGTERM)."""
    cfg = r.cfg
    command = (f"torchrun --nproc_per_node={r.world} -m vitprune" if r.world > 1 else "python -m vitprune")
    command += f" run --resume --out_dir={shlex.quote(cfg.out_dir)} --name={shlex.quote(cfg.run_name)}"
    if r.main:
        pos.save(r.ckpt_dir / "last.pt", r.model, tools.opt, tools.sched, cfg)
        write_summary(r, "interrupted", pos.state, resume_command=command)
        r.log.close(exit_code=128 + signum)
    r.say(f"interrupted at state {pos.state}, epoch {pos.next_epoch}, step {pos.step} (counted from 0); "
          f"resume with: {command}", flush=True)
    raise SystemExit(128 + signum)


def write_summary(r: Run, status: str, states_done: int, **more):
    r.log.summary({"name": r.cfg.run_name, "status": status, "states_done": states_done,
                   "config": r.cfg.to_dict(), **more})


def setup(cfg: Config) -> Run:
    """Everything that can fail on bad input happens here, before the run folder is touched."""
    rank, world, device = init_distributed(cfg)
    bf16 = use_bf16(cfg.precision, device)
    try:  # the backend that will run: Triton only if its self-check passes in this precision
        backend = kernels.resolve_backend(cfg.kernels, device, torch.bfloat16 if bf16 else torch.float32)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    masked_linear, group_reg = kernels.get_ops(backend)
    prep = {"img_size": cfg.img_size, **preprocessing(cfg.model, cfg.pretrained)}
    data = load_data(cfg, device, world)
    data.mean, data.std, data.interpolation = prep["mean"], prep["std"], prep["interpolation"]
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
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    forward = model
    if world > 1:
        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        # Index tensors change shape when the structure changes: one recompile per state.
        forward = torch.compile(forward)
    if rank == 0:
        prepare_run_dir(cfg)
    if world > 1:
        dist.barrier()  # the folder exists (or the run stopped) before any process reads it
    run_dir = Path(cfg.out_dir) / cfg.run_name
    log = RunLog(run_dir, cfg.to_dict(), cfg.wandb, runtime={"kernels_backend": backend, "preprocessing": prep}) \
        if rank == 0 else None
    r = Run(cfg, rank, world, device, data, steps, model, forward, autocast, group_reg, run_dir, log, masked_linear,
            preprocessing=prep)
    set_recipe(r)
    r.say(f"{cfg.run_name}: {cfg.method} on {cfg.dataset}, {cfg.model} "
          f"({count(model, Structure.full(model))['params_total'] / 1e6:.2f}M params), {cfg.states} states × "
          f"{cfg.epochs} epochs" + (f" (states >= 1: {cfg.pruned_epochs})" if cfg.pruned_epochs else "") +
          f", {steps} steps/epoch, {cfg.img_size} px / patch {cfg.patch_size}, "
          f"{device} {'bf16' if bf16 else 'fp32'}, kernels={backend}"
          + (f", {world} processes" if world > 1 else ""))
    return r


def set_recipe(r: Run):
    """--aug=finetune: the data's random-resized crop and the mixer of soft targets."""
    cfg = r.cfg
    if cfg.aug != "finetune":
        return
    r.data.crop = ((cfg.crop_scale_min, 1.0), (1 / cfg.crop_ratio_max, cfg.crop_ratio_max))
    r.mixer = Mixer(cfg.mixup_alpha, cfg.cutmix_alpha, cfg.label_smoothing, r.data.num_classes)
    if (cfg.mixup_alpha or cfg.cutmix_alpha) and (cfg.batch_size // r.world) % 2:
        raise ConfigError(f"--batch_size: {cfg.batch_size} over {r.world} processes leaves an odd share; "
                          f"mixup/cutmix pair the images of a batch: give a multiple of {2 * r.world}")


def begin(r: Run):
    """A new run: its config, the rewind point θ0 (for --rewind=init), then state 0.
    Returns (position, tools, rewind point or None)."""
    if r.main:
        write_json(r.run_dir / "config.json", r.cfg.to_dict())
        write_summary(r, "running", 0)
    rewind = save_rewind_point(r, 0) if r.cfg.rewind_epoch == 0 else None
    full = Structure.full(r.model)
    return (*start_state(r, Position(0, 0, full, full), 0, rewind), rewind)


def resume(r: Run):
    """Continue from the newest checkpoint that verifies (last.pt, else the current state's
    start, else the end of the latest state): the position, model, optimizer, schedule and
    RNG; and the rewind point from rewind.pt once reached. Returns (position, tools, rewind)."""
    cfg = r.cfg
    path, ck, damaged = newest_good_checkpoint(r)
    rewind = None
    if (r.ckpt_dir / "rewind.pt").is_file():
        try:
            rewind = checkpoint.load(r.ckpt_dir / "rewind.pt")
        except checkpoint.Damaged as e:
            raise ConfigError(f"--resume: {r.ckpt_dir / 'rewind.pt'} is damaged ({e}): the rewind point is lost; "
                              f"start the run again with --overwrite") from None
    if path.name.startswith("state_"):
        pos, tools = after_state(r, ck, rewind)
    else:
        pos, ck = Position.from_checkpoint(ck, r.model)
        apply_structure(r.model, pos.alive)  # the forward skips what was dead when the run stopped
        epochs = r.epochs_of(pos.state)
        opt, sched = make_optimizer(cfg, r.model, r.steps * epochs, r.device, epochs)
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        rsst = regularizer(cfg, r.model, pos.alive, pos.keep, r.steps_in_state(pos.state), r.group_reg,
                           pos.rsst_start_norms)
        tools = StepTools(opt, sched, rsst)
    dropped = 0
    if r.main:
        dropped = r.log.truncate(pos.state, pos.next_epoch)
        if pos.state == cfg.states:
            write_summary(r, "finished", cfg.states, last_state=ck["record"])
        else:
            write_summary(r, "running", pos.state)
    if damaged:
        r.say(f"{'; '.join(damaged)}; resuming from {path.name}, {where(path, pos)}: "
              f"{dropped} epoch record{'s' * (dropped != 1)} after it dropped from metrics.jsonl and redone")
    r.say(f"resuming {r.run_dir} at state {pos.state}, epoch {pos.next_epoch}"
          + (f", step {pos.step}" if pos.step else "") + " (counted from 0)")
    return pos, tools, rewind


def checkpoint_candidates(ckpt_dir: Path) -> list:
    """last.pt, then the start and end checkpoints of the states, newest first."""
    order = {"start": 0, "state": 1}  # a state's start comes before its end
    found = [p for p in ckpt_dir.glob("*_*.pt") if p.stem.split("_")[0] in order and p.stem.split("_")[1].isdigit()]
    found.sort(key=lambda p: (int(p.stem.split("_")[1]), order[p.stem.split("_")[0]]), reverse=True)
    return [ckpt_dir / "last.pt", *found]


def newest_good_checkpoint(r: Run):
    """(path, loaded checkpoint, what was skipped and why); ConfigError when none is usable."""
    damaged = []
    for path in checkpoint_candidates(r.ckpt_dir):
        try:
            return path, checkpoint.load(path, r.device), damaged
        except checkpoint.Damaged as e:
            damaged.append(f"{path.name} {e}" if str(e) == "missing" else f"{path.name} damaged ({e})")
    raise ConfigError(f"--resume: no usable checkpoint in {r.ckpt_dir} ({'; '.join(damaged)}); "
                      f"start the run again with --overwrite")


def where(path: Path, pos: Position) -> str:
    """Where a checkpoint puts the loop, in words."""
    if path.name.startswith("state_"):
        return f"the end of state {pos.state - 1}"
    if path.name.startswith("start_"):
        return f"the start of state {pos.state} (epoch {pos.next_epoch})"
    return f"state {pos.state}, epoch {pos.next_epoch}, step {pos.step}"


def after_state(r: Run, ck: dict, rewind: Optional[dict]):
    """Resume from state_XX.pt (the end of state XX): the next state starts from its model,
    structure and RNG. With no state left, the position past the last one and no tools."""
    r.model.load_state_dict(ck["model"])
    if "rng" in ck:
        torch.set_rng_state(ck["rng"].cpu())
    done = Structure.from_state_dict(ck["structure"])
    apply_structure(r.model, done)
    spent = ck.get("record", {})  # the compute spent up to this state's end carries on
    prev = Position(ck["state"], r.epochs_of(ck["state"]), done, done, train_flops=spent.get("train_flops", 0.0),
                    train_time=spent.get("train_time_s", 0.0))
    if ck["state"] + 1 == r.cfg.states:
        return Position(r.cfg.states, 0, done, done), None
    return start_state(r, prev, ck["state"] + 1, rewind)


def start_state(r: Run, prev: Position, state: int, rewind: Optional[dict]):
    """State `state` begins: the method's transition (state >= 1; to the `rewind` point, None:
    not rewound), the accuracy of the network it will become, a fresh optimizer; checkpointed,
    so a resume never redoes a transition."""
    cfg, rewind = r.cfg, rewind or {}
    if state == 0:
        apply_structure(r.model, prev.alive)
        t = Transition(prev.alive, prev.keep, None)
    else:
        t = transition(cfg, r.model, prev.keep, r.data, state, rewind.get("model"), r.steps_in_state(state),
                       r.group_reg)
    pos = Position(state, r.first_epoch(state), t.alive, t.keep,
                   rsst_start_norms=t.regularizer.start_norms if t.regularizer else None,
                   train_flops=prev.train_flops, train_time=prev.train_time)
    with r.live(pos.keep, restore=pos.alive):
        pos.start_acc = r.evaluate("val"), r.evaluate("test")
    opt, sched = make_optimizer(cfg, r.model, r.steps * r.epochs_of(state), r.device, r.epochs_of(state))
    if state > 0 and rewind.get("optimizer"):  # late rewinding: the optimizer and schedule of epoch K too
        opt.load_state_dict(copy.deepcopy(rewind["optimizer"]))  # a copy: steps update it in place
        sched.load_state_dict(rewind["scheduler"])
        zero_dead_moments(r.model, pos.alive, opt)
    tools = StepTools(opt, sched, t.regularizer)
    if r.main:
        report_structure(r.model, state, pos.keep)
        # the state's start survives a damaged last.pt; only the current state's is kept
        pos.save(r.ckpt_dir / f"start_{state:02d}.pt", r.model, opt, sched, cfg)
        checkpoint.remove(r.ckpt_dir / f"start_{state - 1:02d}.pt")
        pos.save(r.ckpt_dir / "last.pt", r.model, opt, sched, cfg)
    return pos, tools


def train_epoch(r: Run, pos: Position, tools: StepTools, epoch: int, stop: StopRequest) -> dict:
    """One epoch of the state (from step pos.step on, after an interruption); returns its
    record (the accuracies of the network the state will become: for RSST, without its
    targets). Raises Interrupted at a step boundary when asked to stop, its place in pos."""
    cfg, state, start = r.cfg, pos.state, pos.step
    loss_sum, correct, seen, elapsed, lr = pos.partial or (0.0, 0.0, 0, 0.0, None)
    t0 = time.time() - elapsed
    # Metrics accumulate on the device: no host sync inside the step loop. The sums of an
    # interrupted epoch are global: one process carries them on.
    sums = torch.tensor([loss_sum, correct] if r.main else [0.0, 0.0], device=r.device)  # loss · n, correct
    heartbeat = time.time()
    r.model.train()
    loss_fn = training_loss(cfg, state_teacher(r, state))
    batches = train_batches(r.data, cfg.batch_size, cfg.seed, state, epoch, r.rank, r.world, start_step=start)
    for i, (x, y) in enumerate(batches, start=start):
        step = (epoch - r.first_epoch(state)) * r.steps + i + 1  # 1-based step within the state
        lr = tools.opt.param_groups[0]["lr"]  # the lr this step uses (the last one is logged)
        rsst = tools.rsst if pos.pruned is None else None  # after RSST's hard prune: no penalty
        x, target = r.mixer(x, y, cfg.seed, state, epoch, i) if r.mixer else (x, y)
        loss, logits = train_step(r.forward, tools.opt, tools.sched, x, target, step, r.autocast,
                                  rsst=rsst, loss_fn=loss_fn)
        if rsst and step == rsst.steps < r.steps_in_state(state):  # --reg_reach < 1: remove the targets now
            hard_prune(r, pos, tools, step)
        sums += torch.stack([loss * len(y), (logits.argmax(1) == y).sum()])
        seen += len(y) * r.world
        if stop.requested(i + 1, r.world, r.device):
            if r.world > 1:
                dist.all_reduce(sums)
            pos.step, pos.partial = i + 1, (*sums.tolist(), seen, time.time() - t0, lr)
            raise Interrupted()
        if r.main and time.time() - heartbeat > 30:
            heartbeat = time.time()
            r.say(f"  state {state} epoch {epoch}: step {i + 1} of {r.steps}, "
                  f"{(i + 1 - start) * cfg.batch_size / (heartbeat - t0 + elapsed):.0f} img/s", flush=True)
    if r.world > 1:
        dist.all_reduce(sums)
    loss_sum, correct = sums.tolist()
    train_time = pos.train_time + time.time() - t0  # before the evaluation: not training
    with r.live(pos.keep, restore=pos.alive):  # RSST evaluates the network it will become
        val_acc, test_acc = r.evaluate("val"), r.evaluate("test")
    return {
        "state": state, "epoch": epoch, "global_epoch": r.epochs_before(state) + epoch,
        "train_loss": loss_sum / seen, "train_acc": 100.0 * correct / seen,
        "val_acc": val_acc, "test_acc": test_acc, "lr": lr,
        **rsst_fields(pos, tools, (epoch + 1 - r.first_epoch(state)) * r.steps, r.steps),
        "state_progress": (epoch + 1 - r.first_epoch(state)) / (r.epochs_of(state) - r.first_epoch(state)),
        "time_s": time.time() - t0,
        "train_flops": pos.train_flops + r.steps * cfg.batch_size * step_flops(r, pos.alive, state),
        "train_time_s": train_time,
    }


def rsst_fields(pos: Position, tools: StepTools, last: int, steps: int) -> dict:
    """RSST's penalty coefficient and the targets' norm ratios (all of them; the largest group)
    at the epoch's last step `last`: at the hard prune in the epoch where it happened, 0 after
    it (the targets are gone), None for the other methods."""
    if pos.pruned is not None:
        now = pos.pruned["step"] > last - steps  # the prune happened in this epoch
        return {k: pos.pruned[k] if now else 0.0 for k in ("reg_lambda", "target_norm_ratio", "target_norm_ratio_max")}
    if tools.rsst is None:
        return {"reg_lambda": 0.0, "target_norm_ratio": None, "target_norm_ratio_max": None}
    ratio, largest = tools.rsst.norm_ratios()
    return {"reg_lambda": tools.rsst.coef(last), "target_norm_ratio": ratio, "target_norm_ratio_max": largest}


def hard_prune(r: Run, pos: Position, tools: StepTools, step: int):
    """RSST removes its targets after step `step` of the state (its last, or --reg_reach of
    the state): the accuracy with them and how far they were driven go to pos.pruned, a
    warning when a target group kept more than NOT_ZEROED of its norm; the optimizer forgets
    them, and the rest of the state trains the pruned network."""
    cfg, rsst = r.cfg, tools.rsst
    ratio, largest = rsst.norm_ratios()
    pos.pruned = {"step": step, "reg_lambda": rsst.coef(step), "target_norm_ratio": ratio,
                  "target_norm_ratio_max": largest, "pre_prune_val_acc": r.evaluate("val"),
                  "pre_prune_test_acc": r.evaluate("test")}
    if largest > NOT_ZEROED:
        fix = (f"lower --reg_residual (now {cfg.reg_residual:g})" if cfg.reg_formula == "residual" else
               f"raise --reg_granularity_prune (now {cfg.reg_granularity_prune:g})")
        r.say(f"warning: RSST targets not driven to zero at the hard prune: the largest target group kept "
              f"{largest:.0%} of its norm (all targets together {ratio:.0%}); {fix}")
    # The epoch's record counts all its steps at the pruned size: the steps of this epoch that
    # still computed the targets cost the difference.
    steps_with_targets = step - (pos.next_epoch - r.first_epoch(pos.state)) * r.steps
    pos.train_flops += steps_with_targets * cfg.batch_size * (step_flops(r, pos.alive, pos.state)
                                                              - step_flops(r, pos.keep, pos.state))
    pos.alive = pos.keep
    apply_structure(r.model, pos.alive)
    zero_dead_moments(r.model, pos.alive, tools.opt)


def end_epoch(r: Run, pos: Position, tools: StepTools, record: dict, epoch_times: list):
    """Record the epoch: console, metrics.jsonl, last.pt."""
    cfg, state, epoch = r.cfg, pos.state, record["epoch"]
    pos.next_epoch, pos.step, pos.partial = epoch + 1, 0, None
    pos.train_flops, pos.train_time = record["train_flops"], record["train_time_s"]
    pos.state_time += record["time_s"]
    pos.history.append(record)
    epoch_times.append(record["time_s"])
    total = cfg.epochs + (cfg.states - 1) * (r.epochs_of(1) - r.first_epoch(1))  # epochs in the run
    done = (epoch + 1 if state == 0 else cfg.epochs + (state - 1) * (r.epochs_of(1) - r.first_epoch(1))
            + epoch + 1 - r.first_epoch(state))
    reg = f" λ {record['reg_lambda']:.3g} ‖w_T‖ {record['target_norm_ratio']:.3f}" if tools.rsst else ""
    r.say(f"state {state} epoch {epoch} | loss {record['train_loss']:.3f} train {record['train_acc']:.1f}% "
          f"val {record['val_acc']:.2f}% test {record['test_acc']:.2f}%{reg} | {record['time_s']:.1f}s, "
          f"{done}/{total} epochs, ETA {fmt.clock((total - done) * sum(epoch_times) / len(epoch_times))}", flush=True)
    if r.main:
        r.log.epoch(record)
        pos.save(r.ckpt_dir / "last.pt", r.model, tools.opt, tools.sched, cfg)


def finish_state(r: Run, pos: Position, tools: StepTools):
    """RSST hard-prunes its targets; the final, pruned network is evaluated and saved."""
    cfg, state = r.cfg, pos.state
    record = {"state": state}
    if tools.rsst and pos.pruned is None:  # RSST's targets reach the residual at the end of the state
        hard_prune(r, pos, tools, r.steps_in_state(state))
    if pos.pruned:
        record.update({k: v for k, v in pos.pruned.items() if k not in ("step", "reg_lambda")},
                      pruned_at=pos.pruned["step"] / r.steps_in_state(state))
    pos.alive = pos.keep
    apply_structure(r.model, pos.alive)
    best = max(pos.history, key=lambda e: e["val_acc"])
    record.update({
        "final_val_acc": r.evaluate("val"), "final_test_acc": r.evaluate("test"),
        "best_val_acc": best["val_acc"], "best_test_acc": best["test_acc"], "best_epoch": best["epoch"],
        "start_val_acc": pos.start_acc[0], "start_test_acc": pos.start_acc[1],
        **count(r.model, pos.alive), "time_s": pos.state_time,
        "train_flops": pos.train_flops, "train_time_s": pos.train_time,
    })
    if r.main:
        r.log.state(record)
        save_torch({"state": state, "model": r.model.state_dict(), "structure": pos.alive.state_dict(),
                    "record": record, "config": cfg.to_dict(), "rng": torch.get_rng_state(),
                    "preprocessing": r.preprocessing},
                   r.ckpt_dir / f"state_{state:02d}.pt")
        write_summary(r, "finished" if state == cfg.states - 1 else "running", state + 1, last_state=record)
    r.say(f"state {state} done: final (pruned) val {record['final_val_acc']:.2f}% test "
          f"{record['final_test_acc']:.2f}%, {record['params_alive'] / 1e6:.3f}M of "
          f"{record['params_total'] / 1e6:.3f}M params alive", flush=True)


def state_teacher(r: Run, state: int) -> Optional[Teacher]:
    """The teacher of a state (--distill; states >= 1 only), loaded once."""
    if r.cfg.distill == "none" or state == 0:
        return None
    if r.teacher is None:
        r.teacher = load_teacher(r.cfg, r.run_dir, r.data.num_classes, r.device, r.masked_linear)
    return r.teacher


def step_flops(r: Run, alive: Structure, state: int) -> float:
    """Training FLOPs per image of one step: forward + backward (2× the forward) of the
    structure the step computes (RSST: with its targets; imp: the dense shape, as its element
    masks save no FLOPs here), plus the teacher's forward when distilling."""
    dense_shape = Structure(alive.heads, alive.neurons)
    teacher = state_teacher(r, state)
    return 3 * count(r.model, dense_shape)["flops_alive"] + (teacher.flops if teacher else 0)


def save_rewind_point(r: Run, epoch: int, tools: StepTools = None) -> dict:
    """The rewind point: weights after `epoch` epochs of state 0 and, for late rewinding, the
    optimizer and LR schedule there too. Kept in memory on every process; the first saves it."""
    cpu = lambda sd: {k: v.detach().to("cpu", copy=True) if torch.is_tensor(v) else v for k, v in sd.items()}
    point = {"model": cpu(r.model.state_dict()), "epoch": epoch,
             "optimizer": copy.deepcopy(tools.opt.state_dict()) if tools else None,
             "scheduler": tools.sched.state_dict() if tools else None}
    if r.main:
        save_torch(point, r.ckpt_dir / "rewind.pt")
    return point


def zero_dead_moments(model, structure: Structure, opt):
    """A dead group's optimizer state is zero too (momentum, Adam's moments), so that a
    restored optimizer cannot move it away from zero."""
    for key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
        zero_dead(model, structure, of=lambda p: opt.state.get(p, {}).get(key))


def report_structure(model, state, keep: Structure):
    """One line saying what the state trains: alive heads/neurons and parameters."""
    c = count(model, keep)
    per_layer = keep.heads.sum(1).tolist()
    print(f"state {state}: {c['heads_alive']}/{c['heads_total']} heads (per layer {per_layer}), "
          f"{c['neurons_alive']}/{c['neurons_total']} neurons, "
          f"{c['params_alive'] / 1e6:.3f}M/{c['params_total'] / 1e6:.3f}M params alive "
          f"({c['flops_alive'] / c['flops_total']:.0%} of the FLOPs)", flush=True)
