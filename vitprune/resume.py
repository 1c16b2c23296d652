"""Where the loop stands (Position), as checkpoints save it, and which checkpoint a resumed run
continues from: the newest that verifies (last.pt, else the current state's start, else the
end of the latest state), its old keys migrated, and one line saying what was lost."""
import dataclasses
from pathlib import Path
from typing import Optional

import torch

from vitprune import checkpoint
from vitprune.config import Config
from vitprune.errors import ConfigError
from vitprune.structure import Structure


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
    state0_fingerprint: Optional[str] = None  # fingerprint.weights_fingerprint of State 0's final weights

    OLD_KEYS = {"epochs_done": "next_epoch", "structure": "alive"}  # last.pt written before the renames

    def save(self, path: Path, model, opt, sched, cfg: Config):
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields = {k: v.state_dict() if isinstance(v, Structure) else v for k, v in fields.items()}
        checkpoint.save({**fields, "model": model.state_dict(), "optimizer": opt.state_dict(),
                         "scheduler": sched.state_dict(), "rng": torch.get_rng_state(), "config": cfg.to_dict()}, path)

    @classmethod
    def from_checkpoint(cls, ck: dict, model):
        """The position a loaded last.pt (or start_XX.pt) holds; loads the model and the RNG.
        Returns (position, checkpoint with its keys migrated)."""
        ck = {cls.OLD_KEYS.get(k, k): v for k, v in ck.items()}
        model.load_state_dict(ck["model"])
        torch.set_rng_state(ck["rng"].cpu())
        fields = {f.name: Structure.from_state_dict(ck[f.name]) if f.type is Structure else ck[f.name]
                  for f in dataclasses.fields(cls) if f.name in ck}  # newer fields: their defaults
        return cls(**fields), ck


def checkpoint_candidates(ckpt_dir: Path) -> list:
    """last.pt, then the start and end checkpoints of the states, newest first."""
    order = {"start": 0, "state": 1}  # a state's start comes before its end
    found = [p for p in ckpt_dir.glob("*_*.pt") if p.stem.split("_")[0] in order and p.stem.split("_")[1].isdigit()]
    found.sort(key=lambda p: (int(p.stem.split("_")[1]), order[p.stem.split("_")[0]]), reverse=True)
    return [ckpt_dir / "last.pt", *found]


def newest_good_checkpoint(ckpt_dir: Path, device):
    """(path, loaded checkpoint, what was skipped and why); ConfigError when none is usable."""
    damaged = []
    for path in checkpoint_candidates(ckpt_dir):
        try:
            return path, checkpoint.load(path, device), damaged
        except checkpoint.Damaged as e:
            damaged.append(f"{path.name} {e}" if str(e) == "missing" else f"{path.name} damaged ({e})")
    raise ConfigError(f"--resume: no usable checkpoint in {ckpt_dir} ({'; '.join(damaged)}); "
                      f"start the run again with --overwrite")


def rewind_point(ckpt_dir: Path) -> Optional[dict]:
    """The saved rewind point (rewind.pt) once the run has reached it, else None."""
    path = ckpt_dir / "rewind.pt"
    if not path.is_file():
        return None
    try:
        return checkpoint.load(path)
    except checkpoint.Damaged as e:
        raise ConfigError(f"--resume: {path} is damaged ({e}): the rewind point is lost; "
                          f"start the run again with --overwrite") from None


def where(path: Path, pos: Position) -> str:
    """Where a checkpoint puts the loop, in words."""
    if path.name.startswith("state_"):
        return f"the end of state {pos.state - 1}"
    if path.name.startswith("start_"):
        return f"the start of state {pos.state} (epoch {pos.next_epoch})"
    return f"state {pos.state}, epoch {pos.next_epoch}, step {pos.step}"


def what_was_lost(damaged: list, path: Path, pos: Position, dropped: int) -> str:
    """The line a resume from an older checkpoint than last.pt prints."""
    return (f"{'; '.join(damaged)}; resuming from {path.name}, {where(path, pos)}: "
            f"{dropped} epoch record{'s' * (dropped != 1)} after it dropped from metrics.jsonl and redone")
