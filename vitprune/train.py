"""The state loop: train → select structure → rewind → retrain, with exact resume.

    θ0 ← initial (or pretrained) weights: the rewind point
    for state in 0 .. states-1:
        state ≥ 1: select the keep set from the trained weights, rewind, prune (the method's transition)
        train `epochs` (RSST: regularise the targets), finish (RSST: hard-prune the targets)
        evaluate the final, pruned network on val and test; checkpoint; log

Where the loop stands is a `resume.Position`, saved with the model, optimizer, LR schedule and
RNG in checkpoints/last.pt at the start of every state and after every epoch; the data order
depends only on (seed, state, epoch). So a killed run resumed with --resume gives the same
numbers as one that was never interrupted.
"""
import copy
import signal
import time
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from vitprune import checkpoint, fmt, log
from vitprune.config import NOT_ZEROED, Config
from vitprune.data.core import train_batches
from vitprune.distill import training_loss
from vitprune.fingerprint import weights_fingerprint
from vitprune.methods import RsstRegularizer, Transition, regularizer, transition
from vitprune.errors import ConfigError
from vitprune.resume import (Position, config_edits, newest_good_checkpoint, rebuilt_rewind_point, rewind_point,
                             what_was_lost)
from vitprune.runfolder import RunFolder, claim, run_name
from vitprune.runtime import Run, setup
from vitprune.step import train_step
from vitprune.stopping import Interrupted, StopRequest, resume_command
from vitprune.structure import Structure, apply_structure, count, step_flops, widths, zero_dead_moments


class StepTools(NamedTuple):
    """What the steps of one state use: optimizer, LR schedule, RSST's penalty (or None)."""
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    rsst: Optional[RsstRegularizer]


# ---- the loop -------------------------------------------------------------------------------

def run(cfg: Config, folder: RunFolder = None) -> Path:
    """Train the run `cfg` describes in its folder (`folder`: runfolder.claim's, else claimed here),
    holding the folder's lock until the run ends."""
    stop = StopRequest()
    with folder or claim(cfg) as folder, stop.handling_signals():
        r = setup(cfg, folder)
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


def begin(r: Run):
    """A new run: its config, the rewind point θ0 (for --rewind=init), then state 0.
    Returns (position, tools, rewind point or None)."""
    if r.main:  # config.json is written when the folder is made (runfolder.RunFolder.prepare)
        write_summary(r, "running", 0)
    rewind = save_rewind_point(r, 0) if r.cfg.rewind_epoch == 0 else None
    full = Structure.full(r.model)
    return (*start_state(r, Position(0, 0, full, full), 0, rewind), rewind)


def resume(r: Run):
    """Continue from the newest usable checkpoint (resume.py): the position, model, optimizer,
    schedule and RNG, and the rewind point once reached; with none, start again from scratch.
    Returns (position, tools, rewind)."""
    rewind, lost = resumed_rewind_point(r)  # first: the model still holds θ0
    path, ck, skipped = newest_good_checkpoint(r.ckpt_dir, r.device, log.read_metrics(r.run_dir))
    if lost or path is None:
        return restart(r, lost or "; ".join(skipped))
    edited = config_edits(r.cfg.to_dict(), ck.get("config", {}))
    if edited:
        raise ConfigError(f"--resume: {r.run_dir / 'config.json'} was edited: {edited} in {path.name}; restore it")
    if path.name.startswith("state_"):
        pos, tools = after_state(r, ck, rewind)
    else:
        pos, ck = Position.from_checkpoint(ck, r.model)
        apply_structure(r.model, pos.alive)  # the forward skips what was dead when the run stopped
        opt, sched = r.optimizer(pos.state)
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        rsst = regularizer(r.cfg, r.model, pos.alive, pos.keep, r.steps_in_state(pos.state), r.group_reg,
                           pos.rsst_start_norms)
        tools = StepTools(opt, sched, rsst)
    dropped = 0
    if r.main:
        if pos.state0_fingerprint:  # State 0 is done: summary.json carries it on
            r.log.runtime["state0_fingerprint"] = pos.state0_fingerprint
        dropped = r.log.truncate(pos.state, pos.next_epoch)
        if pos.state == r.cfg.states:
            write_summary(r, "finished", r.cfg.states, last_state=ck["record"])
        else:
            write_summary(r, "running", pos.state)
    if skipped:
        r.say(what_was_lost(skipped, path, pos, dropped))
    r.say(f"resuming {r.run_dir} at state {pos.state}, epoch {pos.next_epoch}"
          + (f", step {pos.step}" if pos.step else "") + " (counted from 0)")
    return pos, tools, rewind


def resumed_rewind_point(r: Run):
    """(the rewind point or None, why it is lost or None). A damaged θ0 (--rewind=init) is
    rebuilt from the freshly built model when that is, byte for byte, what the run saved."""
    try:
        return rewind_point(r.ckpt_dir), None
    except checkpoint.Damaged as e:
        theta0 = rewind_state(r, 0) if r.cfg.rewind_epoch == 0 else None
        if theta0 and rebuilt_rewind_point(r.ckpt_dir, theta0, write=r.main):
            r.say(f"rewind.pt damaged ({e}); θ0 rebuilt from the seed: its checksum is the one the run recorded")
            return theta0, None
        return None, f"rewind.pt damaged ({e}), and the rewind point cannot be rebuilt"


def restart(r: Run, why: str):
    """No checkpoint to continue from: the run starts again from scratch (the model still holds
    θ0), without what it wrote before; one line says why."""
    r.say(f"--resume: nothing to continue from ({why}); starting the run again from scratch")
    if r.main:
        for path in r.ckpt_dir.glob("*.pt"):
            checkpoint.remove(path)
        r.log.truncate(0, 0)
    return begin(r)


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
                    train_time=spent.get("train_time_s", 0.0), state0_fingerprint=spent.get("state0_fingerprint"))
    if ck["state"] + 1 == r.cfg.states:
        return Position(r.cfg.states, 0, done, done, state0_fingerprint=prev.state0_fingerprint), None
    return start_state(r, prev, ck["state"] + 1, rewind)


# ---- a state: its start, its epochs, its finish ---------------------------------------------

def start_state(r: Run, prev: Position, state: int, rewind: Optional[dict]):
    """State `state` begins: the method's transition (state >= 1; to the `rewind` point, None:
    not rewound; --rewind=random: a fresh init), the accuracy of the network it will become, a
    fresh optimizer; checkpointed, so a resume never redoes a transition."""
    cfg, rewind = r.cfg, rewind or {}
    if state == 0:
        apply_structure(r.model, prev.alive)
        t = Transition(prev.alive, prev.keep, None)
    else:
        rewind_to = r.fresh_init(state) if cfg.rewind == "random" else rewind.get("model")
        t = transition(cfg, r.model, prev.keep, r.data, state, rewind_to, r.steps_in_state(state), r.group_reg)
    pos = Position(state, r.first_epoch(state), t.alive, t.keep,
                   rsst_start_norms=t.regularizer.start_norms if t.regularizer else None,
                   train_flops=prev.train_flops, train_time=prev.train_time, state0_fingerprint=prev.state0_fingerprint)
    with r.live(pos.keep, restore=pos.alive):
        pos.start_acc = r.evaluate("val"), r.evaluate("test")
    opt, sched = r.optimizer(state)
    if state > 0 and rewind.get("optimizer"):  # late rewinding: the optimizer and schedule of epoch K too
        opt.load_state_dict(copy.deepcopy(rewind["optimizer"]))  # a copy: steps update it in place
        sched.load_state_dict(rewind["scheduler"])
        zero_dead_moments(r.model, pos.alive, opt)
    tools = StepTools(opt, sched, t.regularizer)
    if r.main:
        print(log.structure_line(state, count(r.model, pos.keep), widths(pos.keep)), flush=True)
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
    loss_fn = training_loss(cfg, r.teacher_of(state))
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
        "train_flops": pos.train_flops + r.epoch_flops(pos.alive, state),
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
    teacher = r.teacher_flops(pos.state)
    pos.train_flops += steps_with_targets * cfg.batch_size * (step_flops(r.model, pos.alive, teacher)
                                                              - step_flops(r.model, pos.keep, teacher))
    pos.alive = pos.keep
    rsst.prune(tools.opt)


def end_epoch(r: Run, pos: Position, tools: StepTools, record: dict, epoch_times: list):
    """Record the epoch: console, metrics.jsonl, last.pt."""
    cfg, state, epoch = r.cfg, pos.state, record["epoch"]
    pos.next_epoch, pos.step, pos.partial = epoch + 1, 0, None
    pos.train_flops, pos.train_time = record["train_flops"], record["train_time_s"]
    pos.state_time += record["time_s"]
    pos.history.append(record)
    epoch_times.append(record["time_s"])
    later = r.epochs_of(1) - r.first_epoch(1)  # the epochs every state >= 1 trains
    total = cfg.epochs + (cfg.states - 1) * later
    done = epoch + 1 if state == 0 else cfg.epochs + (state - 1) * later + epoch + 1 - r.first_epoch(state)
    eta = (total - done) * sum(epoch_times) / len(epoch_times)
    r.say(log.epoch_line(record, tools.rsst is not None, done, total, eta), flush=True)
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
    if state == 0:  # which State 0 the later states prune: runs of one seed must share it to be paired
        pos.state0_fingerprint = weights_fingerprint(r.model.state_dict())
        if r.main:
            r.log.runtime["state0_fingerprint"] = pos.state0_fingerprint
    best = max(pos.history, key=lambda e: e["val_acc"])
    record.update({
        "final_val_acc": r.evaluate("val"), "final_test_acc": r.evaluate("test"),
        "best_val_acc": best["val_acc"], "best_test_acc": best["test_acc"], "best_epoch": best["epoch"],
        "start_val_acc": pos.start_acc[0], "start_test_acc": pos.start_acc[1],
        **count(r.model, pos.alive), **widths(pos.alive), "time_s": pos.state_time,
        "train_flops": pos.train_flops, "train_time_s": pos.train_time,
        # an epoch of this state's final network as a retraining trains it: the equal-compute unit
        "ticket_epoch_flops": r.epoch_flops(pos.alive, state),
        **r.facts, "state0_fingerprint": pos.state0_fingerprint,
    })
    if r.main:
        r.log.state(record)
        checkpoint.save({"state": state, "model": r.model.state_dict(), "structure": pos.alive.state_dict(),
                         "record": record, "config": cfg.to_dict(), "rng": torch.get_rng_state(),
                         "preprocessing": r.preprocessing}, r.ckpt_dir / f"state_{state:02d}.pt")
        write_summary(r, "finished" if state == cfg.states - 1 else "running", state + 1, last_state=record)
    r.say(f"state {state} done: final (pruned) val {record['final_val_acc']:.2f}% test "
          f"{record['final_test_acc']:.2f}%, {record['params_alive'] / 1e6:.3f}M of "
          f"{record['params_total'] / 1e6:.3f}M params alive", flush=True)


# ---- around the states ----------------------------------------------------------------------

def stop_here(r: Run, pos: Position, tools: StepTools, signum: int):
    """After an interruption: last.pt at this step, summary.json "interrupted", the command
    that resumes, and the exit code of the signal (130 for SIGINT, 143 for SIGTERM)."""
    command = resume_command(r.cfg.out_dir, run_name(r.cfg), r.world)
    if r.main:
        pos.save(r.ckpt_dir / "last.pt", r.model, tools.opt, tools.sched, r.cfg)
        write_summary(r, "interrupted", pos.state, resume_command=command)
        r.log.close(exit_code=128 + signum)
    r.say(f"interrupted at state {pos.state}, epoch {pos.next_epoch}, step {pos.step} (counted from 0); "
          f"resume with: {command}", flush=True)
    raise SystemExit(128 + signum)


def write_summary(r: Run, status: str, states_done: int, **more):
    r.log.summary({"name": run_name(r.cfg), "status": status, "states_done": states_done,
                   "config": r.cfg.to_dict(), **more})


def rewind_state(r: Run, epoch: int, tools: StepTools = None) -> dict:
    """The rewind point: weights after `epoch` epochs of state 0 and, for late rewinding, the
    optimizer and LR schedule there too."""
    cpu = lambda sd: {k: v.detach().to("cpu", copy=True) if torch.is_tensor(v) else v for k, v in sd.items()}
    return {"model": cpu(r.model.state_dict()), "epoch": epoch,
            "optimizer": copy.deepcopy(tools.opt.state_dict()) if tools else None,
            "scheduler": tools.sched.state_dict() if tools else None}


def save_rewind_point(r: Run, epoch: int, tools: StepTools = None) -> dict:
    """The rewind point (rewind_state), kept in memory on every process; the first saves it."""
    point = rewind_state(r, epoch, tools)
    if r.main:
        checkpoint.save(point, r.ckpt_dir / "rewind.pt")
    return point
