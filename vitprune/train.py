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

from vitprune import fmt, kernels
from vitprune.config import NOT_ZEROED, Config, ConfigError
from vitprune.data import LoopData, load_data, steps_per_epoch, train_batches
from vitprune.log import RunLog, write_atomic, write_json
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


def make_optimizer(cfg: Config, model, steps: int, device):
    """Optimizer and per-step LR schedule of one state (every state starts them afresh)."""
    decay, no_decay, skip = [], [], model.no_weight_decay()  # timm's: embeddings and tokens
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and name not in skip else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = {"fused": True} if device.type == "cuda" else {}
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, **fused)
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr, **fused)
    per_epoch = steps // cfg.epochs
    warmup = cfg.warmup_epochs * per_epoch

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        if cfg.lr_schedule == "multistep":  # x0.1 at 50% and 75% of the state's epochs
            epoch = step // per_epoch
            return 0.1 ** ((epoch >= cfg.epochs * 0.5) + (epoch >= cfg.epochs * 0.75))
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


def train_step(forward, opt, sched, x, y, step: int, autocast, label_smoothing=0.0, rsst=None):
    """One optimisation step; returns (loss, logits) as device tensors (no host sync)."""
    with autocast():
        logits = forward(x)
        loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
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
        if not (run_dir / "checkpoints" / "last.pt").is_file():
            raise ConfigError(f"--resume: no checkpoint at {run_dir}/checkpoints/last.pt; "
                              f"start the run without --resume")
        return run_dir
    if run_dir.exists() and any(run_dir.iterdir()):
        if not cfg.overwrite:
            raise ConfigError(f"--name: run folder {run_dir} already exists; pass --resume to continue it "
                              f"or --overwrite to replace it")
        shutil.rmtree(run_dir)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    return run_dir


def save_torch(obj, path: Path):
    write_atomic(path, lambda f: torch.save(obj, f))


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

    def steps_in_state(self, state: int) -> int:
        return (self.cfg.epochs - self.first_epoch(state)) * self.steps

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

    OLD_KEYS = {"epochs_done": "next_epoch", "structure": "alive"}  # last.pt written before the renames

    def save(self, path: Path, model, opt, sched, cfg: Config):
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields = {k: v.state_dict() if isinstance(v, Structure) else v for k, v in fields.items()}
        save_torch({**fields, "model": model.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "rng": torch.get_rng_state(), "config": cfg.to_dict()}, path)

    @classmethod
    def load(cls, path: Path, model, device):
        """The saved position; loads the model and the RNG. Returns (position, checkpoint)."""
        ck = torch.load(path, map_location=device, weights_only=False)
        ck = {cls.OLD_KEYS.get(k, k): v for k, v in ck.items()}
        model.load_state_dict(ck["model"])
        torch.set_rng_state(ck["rng"].cpu())
        fields = {f.name: Structure.from_state_dict(ck[f.name]) if f.type is Structure else ck[f.name]
                  for f in dataclasses.fields(cls)}
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
                for epoch in range(pos.next_epoch, cfg.epochs):
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
    log = RunLog(run_dir, cfg.to_dict(), cfg.wandb, runtime={"kernels_backend": backend, "preprocessing": prep}) if rank == 0 else None
    r = Run(cfg, rank, world, device, data, steps, model, forward, autocast, group_reg, run_dir, log, prep)
    r.say(f"{cfg.run_name}: {cfg.method} on {cfg.dataset}, {cfg.model} "
          f"({count(model, Structure.full(model))['params_total'] / 1e6:.2f}M params), {cfg.states} states × "
          f"{cfg.epochs} epochs, {steps} steps/epoch, {cfg.img_size} px / patch {cfg.patch_size}, "
          f"{device} {'bf16' if bf16 else 'fp32'}, kernels={backend}"
          + (f", {world} processes" if world > 1 else ""))
    return r


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
    """Continue from checkpoints/last.pt: the position, model, optimizer, schedule and RNG;
    and the rewind point from rewind.pt once reached. Returns (position, tools, rewind)."""
    cfg = r.cfg
    pos, ck = Position.load(r.ckpt_dir / "last.pt", r.model, r.device)
    apply_structure(r.model, pos.alive)  # the forward skips what was dead when the run stopped
    rewind = None
    if (r.ckpt_dir / "rewind.pt").is_file():
        rewind = torch.load(r.ckpt_dir / "rewind.pt", map_location="cpu", weights_only=False)
    opt, sched = make_optimizer(cfg, r.model, r.steps * cfg.epochs, r.device)
    opt.load_state_dict(ck["optimizer"])
    sched.load_state_dict(ck["scheduler"])
    rsst = regularizer(cfg, r.model, pos.alive, pos.keep, r.steps_in_state(pos.state), r.group_reg,
                       pos.rsst_start_norms)
    if r.main:
        r.log.truncate(pos.state, pos.next_epoch)
        write_summary(r, "running", pos.state)
    r.say(f"resuming {r.run_dir} at state {pos.state}, epoch {pos.next_epoch}"
          + (f", step {pos.step}" if pos.step else "") + " (counted from 0)")
    return pos, StepTools(opt, sched, rsst), rewind


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
                   rsst_start_norms=t.regularizer.start_norms if t.regularizer else None)
    with r.live(pos.keep, restore=pos.alive):
        pos.start_acc = r.evaluate("val"), r.evaluate("test")
    opt, sched = make_optimizer(cfg, r.model, r.steps * cfg.epochs, r.device)
    if state > 0 and rewind.get("optimizer"):  # late rewinding: the optimizer and schedule of epoch K too
        opt.load_state_dict(copy.deepcopy(rewind["optimizer"]))  # a copy: steps update it in place
        sched.load_state_dict(rewind["scheduler"])
        zero_dead_moments(r.model, pos.alive, opt)
    tools = StepTools(opt, sched, t.regularizer)
    if r.main:
        report_structure(r.model, state, pos.keep)
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
    batches = train_batches(r.data, cfg.batch_size, cfg.seed, state, epoch, r.rank, r.world, start_step=start)
    for i, (x, y) in enumerate(batches, start=start):
        step = (epoch - r.first_epoch(state)) * r.steps + i + 1  # 1-based step within the state
        lr = tools.opt.param_groups[0]["lr"]  # the lr this step uses (the last one is logged)
        loss, logits = train_step(r.forward, tools.opt, tools.sched, x, y, step, r.autocast, cfg.label_smoothing,
                                  tools.rsst)
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
    with r.live(pos.keep, restore=pos.alive):  # RSST evaluates the network it will become
        val_acc, test_acc = r.evaluate("val"), r.evaluate("test")
    return {
        "state": state, "epoch": epoch, "global_epoch": state * cfg.epochs + epoch,
        "train_loss": loss_sum / seen, "train_acc": 100.0 * correct / seen,
        "val_acc": val_acc, "test_acc": test_acc, "lr": lr,
        "reg_lambda": tools.rsst.coef((epoch + 1 - r.first_epoch(state)) * r.steps) if tools.rsst else 0.0,
        "target_norm_ratio": tools.rsst.norm_ratio() if tools.rsst else None,
        "time_s": time.time() - t0,
    }


def end_epoch(r: Run, pos: Position, tools: StepTools, record: dict, epoch_times: list):
    """Record the epoch: console, metrics.jsonl, last.pt."""
    cfg, state, epoch = r.cfg, pos.state, record["epoch"]
    pos.next_epoch, pos.step, pos.partial = epoch + 1, 0, None
    pos.state_time += record["time_s"]
    pos.history.append(record)
    epoch_times.append(record["time_s"])
    total = cfg.epochs + (cfg.states - 1) * (cfg.epochs - r.first_epoch(1))  # epochs in the run
    done = (epoch + 1 if state == 0 else cfg.epochs + (state - 1) * (cfg.epochs - r.first_epoch(1))
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
    cfg, state, rsst = r.cfg, pos.state, tools.rsst
    record = {"state": state}
    if rsst:
        record["pre_prune_val_acc"], record["pre_prune_test_acc"] = r.evaluate("val"), r.evaluate("test")
        record["target_norm_ratio"] = rsst.norm_ratio()
        if record["target_norm_ratio"] > NOT_ZEROED:
            fix = (f"lower --reg_residual (now {cfg.reg_residual:g})" if cfg.reg_formula == "residual" else
                   f"raise --reg_granularity_prune (now {cfg.reg_granularity_prune:g})")
            r.say(f"warning: RSST targets kept {record['target_norm_ratio']:.0%} of their norm at the hard "
                  f"prune (not driven to zero); {fix}")
    pos.alive = pos.keep
    apply_structure(r.model, pos.alive)
    best = max(pos.history, key=lambda e: e["val_acc"])
    record.update({
        "final_val_acc": r.evaluate("val"), "final_test_acc": r.evaluate("test"),
        "best_val_acc": best["val_acc"], "best_test_acc": best["test_acc"], "best_epoch": best["epoch"],
        "start_val_acc": pos.start_acc[0], "start_test_acc": pos.start_acc[1],
        **count(r.model, pos.alive), "time_s": pos.state_time,
    })
    if r.main:
        r.log.state(record)
        save_torch({"state": state, "model": r.model.state_dict(), "structure": pos.alive.state_dict(),
                    "record": record, "config": cfg.to_dict(), "preprocessing": r.preprocessing},
                   r.ckpt_dir / f"state_{state:02d}.pt")
        write_summary(r, "finished" if state == cfg.states - 1 else "running", state + 1, last_state=record)
    r.say(f"state {state} done: final (pruned) val {record['final_val_acc']:.2f}% test "
          f"{record['final_test_acc']:.2f}%, {record['params_alive'] / 1e6:.3f}M of "
          f"{record['params_total'] / 1e6:.3f}M params alive", flush=True)


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
