"""The state loop: train → select structure → rewind → retrain, with exact resume.

    θ0 ← initial (or pretrained) weights: the rewind point
    for s in 0 .. states-1:
        s ≥ 1: select the keep set from the trained weights, rewind, prune (method)
        train `epochs` (RSST: regularise the targets), finish (RSST: hard-prune the targets)
        evaluate the final, pruned network on val and test; checkpoint; log

Everything a state needs to continue is in checkpoints/last.pt, written atomically after
every epoch; the data order depends only on (seed, state, epoch). So a killed run resumed
with --resume gives the same numbers as one that was never interrupted.
"""
import contextlib
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from vitprune import kernels
from vitprune.config import Config, ConfigError
from vitprune.data import eval_batches, load_data, steps_per_epoch, train_batches
from vitprune.log import RunLog, read_metrics, write_json_atomic
from vitprune.methods import RsstRegularizer, transition
from vitprune.model import build_model, set_kernels
from vitprune.structure import Structure, apply_structure, count, set_live


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device: {name!r} requested but CUDA is not available; choose from auto, cpu")
    return device


def save_atomic(obj, path: Path):
    """torch.save through a temp file + rename: a kill never leaves a torn checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def make_optimizer(cfg: Config, model, steps: int, device):
    """Optimizer and per-step LR schedule of one state (every state starts them afresh)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and name not in ("pos_embed", "cls_token") else no_decay).append(p)
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
def evaluate(model, x, y, autocast, rank: int = 0, world: int = 1) -> float:
    """Top-1 accuracy (%) in large batches; each process takes its share; one host sync."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=y.device)
    for xb, yb in eval_batches(x[rank::world], y[rank::world], 1000):
        with autocast():
            correct += (model(xb).argmax(1) == yb).sum()
    if world > 1:
        dist.all_reduce(correct)
    model.train(was_training)
    return 100.0 * correct.item() / len(y)


def train_step(forward, opt, sched, x, y, step: int, autocast, label_smoothing=0.0, rsst=None):
    """One optimisation step; returns (loss, logits) as device tensors (no host sync)."""
    with autocast():
        logits = forward(x)
        loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if rsst:
        rsst.before_step(step)
    opt.step()
    if rsst:
        rsst.after_step(step)
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


def fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def run(cfg: Config) -> Path:
    # --- everything that can fail on bad input happens before the run folder is touched
    rank, world, device = init_distributed(cfg)
    main = rank == 0  # only the first process writes files and prints
    say = print if main else (lambda *a, **k: None)
    try:
        backend = kernels.resolve_backend(cfg.kernels, device)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    masked_linear, group_reg = kernels.get_ops(backend)
    data = load_data(cfg.dataset, cfg.data_dir, cfg.seed).to(device)
    steps = steps_per_epoch(data, cfg.batch_size)
    if steps == 0:
        raise ConfigError(f"--batch_size: {cfg.batch_size} is larger than the training set "
                          f"({len(data.train_y)} images)")
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.num_classes)
    if cfg.pretrained:
        from vitprune.model import load_pretrained
        say(load_pretrained(model, cfg.pretrained))
    model.to(device)
    set_kernels(model, masked_linear)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    forward = model
    if world > 1:
        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        # Index tensors change shape when the structure changes: one recompile per state.
        forward = torch.compile(forward)
    run_dir = Path(cfg.out_dir) / cfg.run_name
    if main:
        prepare_run_dir(cfg)
    if world > 1:
        dist.barrier()  # the folder exists (or the run stopped) before any process reads it
    ckpt_dir = run_dir / "checkpoints"
    log = RunLog(run_dir, cfg.to_dict(), cfg.wandb) if main else None
    evaluate_split = lambda split: evaluate(model, getattr(data, f"{split}_x"), getattr(data, f"{split}_y"),
                                            autocast, rank, world)

    # --- the run's position: (state, epochs done in it) and what the state carries
    structure = Structure.full(model)
    keep = structure
    state, epochs_done = 0, 0
    start_acc = None     # (val, test) of the state's network before training
    state_time = 0.0
    rsst_start_norm = None
    theta0 = None        # the rewind point, kept in memory once reached
    if cfg.resume:
        ck = torch.load(ckpt_dir / "last.pt", map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        structure, keep = Structure.from_state_dict(ck["structure"]), Structure.from_state_dict(ck["keep"])
        apply_structure(model, structure)  # the forward skips what was dead when the run stopped
        state, epochs_done, start_acc, state_time = ck["state"], ck["epochs_done"], ck["start_acc"], ck["state_time"]
        rsst_start_norm = ck["rsst_start_norm"]
        torch.set_rng_state(ck["rng"])
        if (ckpt_dir / "rewind.pt").is_file():
            theta0 = torch.load(ckpt_dir / "rewind.pt", map_location="cpu")["model"]
        if main:
            log.truncate(state, epochs_done)
        say(f"resuming {run_dir} at state {state}, epoch {epochs_done}")
    else:
        if main:
            write_json_atomic(run_dir / "config.json", cfg.to_dict())
        if cfg.rewind_epoch == 0:
            theta0 = save_rewind_point(model, 0, ckpt_dir, main)
    say(f"{cfg.run_name}: {cfg.method} on {cfg.dataset}, {cfg.model} "
        f"({count(model, structure)['params_total'] / 1e6:.2f}M params), {cfg.states} states × "
        f"{cfg.epochs} epochs, {steps} steps/epoch, {device} {'bf16' if bf16 else 'fp32'}, kernels={backend}"
        + (f", {world} processes" if world > 1 else ""))

    run_start, epoch_times = time.time(), []
    resumed_mid_state = cfg.resume
    while state < cfg.states:
        if not resumed_mid_state:
            state_time = 0.0
            if state > 0:
                structure, keep = transition(cfg, model, structure, data, state)
                if theta0 is not None:
                    model.load_state_dict(theta0)
            apply_structure(model, structure)
            set_live(model, keep)
            start_acc = (evaluate_split("val"), evaluate_split("test"))
            set_live(model, structure)
            epochs_done, rsst_start_norm = 0, None
            if main:
                report_structure(cfg, model, state, keep)
        opt, sched = make_optimizer(cfg, model, steps * cfg.epochs, device)
        rsst = None
        # RSST's targets: alive while the state trains, gone after it.
        head_targets, neuron_targets = structure.heads & ~keep.heads, structure.neurons & ~keep.neurons
        if head_targets.any() or neuron_targets.any():
            rsst = RsstRegularizer(model, head_targets, neuron_targets, cfg, steps * cfg.epochs, group_reg,
                                   rsst_start_norm)
            rsst_start_norm = rsst.start_norm
        if resumed_mid_state:
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
            del ck
        resumed_mid_state = False
        history = [r for r in read_metrics(run_dir) if r["kind"] == "epoch" and r["state"] == state]

        for epoch in range(epochs_done, cfg.epochs):
            t0 = time.time()
            # Metrics accumulate on the device: no host sync inside the step loop.
            sums = torch.zeros(2, device=device)  # loss · n, correct
            seen, heartbeat = 0, time.time()
            model.train()
            for i, (x, y) in enumerate(train_batches(data, cfg.batch_size, cfg.seed, state, epoch, rank, world)):
                step = epoch * steps + i + 1  # 1-based step within the state
                lr = opt.param_groups[0]["lr"]  # the lr this step uses (logged per epoch)
                loss, logits = train_step(forward, opt, sched, x, y, step, autocast, cfg.label_smoothing, rsst)
                sums += torch.stack([loss * len(y), (logits.argmax(1) == y).sum()])
                seen += len(y) * world
                if main and time.time() - heartbeat > 30:
                    heartbeat = time.time()
                    say(f"  state {state} epoch {epoch + 1}: step {i + 1}/{steps}, "
                        f"{(i + 1) * cfg.batch_size / (heartbeat - t0):.0f} img/s", flush=True)
            if world > 1:
                dist.all_reduce(sums)
            loss_sum, correct = sums.tolist()
            set_live(model, keep)  # RSST evaluates the network it will become
            val_acc, test_acc = evaluate_split("val"), evaluate_split("test")
            set_live(model, structure)
            record = {
                "state": state, "epoch": epoch, "global_epoch": state * cfg.epochs + epoch,
                "train_loss": loss_sum / seen, "train_acc": 100.0 * correct / seen,
                "val_acc": val_acc, "test_acc": test_acc, "lr": lr,
                "reg_lambda": rsst.lam((epoch + 1) * steps) if rsst else 0.0,
                "target_norm_ratio": rsst.norm_ratio() if rsst else None,
                "time_s": time.time() - t0,
            }
            state_time += record["time_s"]
            history.append(record)
            epoch_times.append(record["time_s"])
            left = (cfg.states - state - 1) * cfg.epochs + cfg.epochs - epoch - 1
            reg = f" λ {record['reg_lambda']:.3g} ‖w_T‖ {record['target_norm_ratio']:.3f}" if rsst else ""
            say(f"state {state}/{cfg.states - 1} epoch {epoch + 1}/{cfg.epochs} | loss {record['train_loss']:.3f} "
                f"train {record['train_acc']:.1f}% val {val_acc:.2f}% test {test_acc:.2f}%{reg} | "
                f"{record['time_s']:.1f}s, ETA {fmt_time(left * sum(epoch_times) / len(epoch_times))}", flush=True)
            if state == 0 and cfg.rewind_epoch == epoch + 1:
                theta0 = save_rewind_point(model, epoch + 1, ckpt_dir, main)
            if main:
                log.epoch(record)
                save_atomic({
                    "state": state, "epochs_done": epoch + 1, "model": model.state_dict(),
                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "structure": structure.state_dict(), "keep": keep.state_dict(),
                    "start_acc": start_acc, "state_time": state_time, "rsst_start_norm": rsst_start_norm,
                    "rng": torch.get_rng_state(), "config": cfg.to_dict(),
                }, ckpt_dir / "last.pt")

        # --- finish the state: RSST hard-prunes its targets; report the pruned network
        record = {"state": state}
        if rsst:
            record["pre_prune_val_acc"], record["pre_prune_test_acc"] = evaluate_split("val"), evaluate_split("test")
            record["target_norm_ratio"] = rsst.norm_ratio()
            if record["target_norm_ratio"] > 0.1:
                say(f"warning: RSST targets kept {record['target_norm_ratio']:.0%} of their norm at the hard "
                    f"prune (not driven to zero); raise --reg_granularity_prune (now {cfg.reg_granularity_prune:g})")
        structure = keep
        apply_structure(model, structure)
        best = max(history, key=lambda r: r["val_acc"])
        record.update({
            "final_val_acc": evaluate_split("val"), "final_test_acc": evaluate_split("test"),
            "best_val_acc": best["val_acc"], "best_test_acc": best["test_acc"], "best_epoch": best["epoch"],
            "start_val_acc": start_acc[0], "start_test_acc": start_acc[1],
            **count(model, structure), "time_s": state_time,
        })
        if main:
            log.state(record)
            save_atomic({"state": state, "model": model.state_dict(), "structure": structure.state_dict(),
                         "record": record, "config": cfg.to_dict()}, ckpt_dir / f"state_{state:02d}.pt")
            log.summary({
                "name": cfg.run_name, "status": "finished" if state == cfg.states - 1 else "running",
                "states_done": state + 1, "config": cfg.to_dict(), "last_state": record})
        say(f"state {state} done: final (pruned) val {record['final_val_acc']:.2f}% test "
            f"{record['final_test_acc']:.2f}%, {record['params_alive'] / 1e6:.3f}M of "
            f"{record['params_total'] / 1e6:.3f}M params alive", flush=True)
        state += 1
    if main:
        log.close()
    say(f"done in {fmt_time(time.time() - run_start)}; results in {run_dir} (metrics.jsonl, summary.json)")
    return run_dir


def save_rewind_point(model, epoch: int, ckpt_dir: Path, main: bool) -> dict:
    """Keep θ (the rewind point) in memory on every process; the first one also saves it."""
    theta = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    if main:
        save_atomic({"model": theta, "epoch": epoch}, ckpt_dir / "rewind.pt")
    return theta


def report_structure(cfg, model, state, keep: Structure):
    """One line saying what the state trains: alive heads/neurons and parameters."""
    c = count(model, keep)
    per_layer = keep.heads.sum(1).tolist()
    print(f"state {state}: {c['heads_alive']}/{c['heads_total']} heads (per layer {per_layer}), "
          f"{c['neurons_alive']}/{c['neurons_total']} neurons, "
          f"{c['params_alive'] / 1e6:.3f}M/{c['params_total'] / 1e6:.3f}M params alive "
          f"({c['flops_alive'] / c['flops_total']:.0%} of the FLOPs)", flush=True)
