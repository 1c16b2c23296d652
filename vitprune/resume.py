"""Where the loop stands (Position), as checkpoints save it, and which checkpoint a resumed run
continues from: the newest that verifies and that metrics.jsonl reaches (last.pt, else the
current state's start, else the end of the latest state), its old keys migrated, and one line
saying what was lost. With none, the run starts again from scratch; a damaged rewind point θ0
is rebuilt from the seed when its checksum says it is the same."""
import dataclasses
import hashlib
import io
from pathlib import Path
from typing import Optional

import torch

from vitprune import checkpoint
from vitprune.config import EXECUTION_FLAGS, FIELDS, Config
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


def newest_good_checkpoint(ckpt_dir: Path, device, records: list):
    """(path, loaded checkpoint, what was skipped and why) of the newest checkpoint that verifies
    and that `records` (metrics.jsonl) reach; path None when there is none. A checkpoint that
    needs pickle stops the resume (checkpoint.NeedsPickle), as anything not ours would."""
    skipped = []
    for path in checkpoint_candidates(ckpt_dir):
        try:
            ck = checkpoint.load(path, device)
        except checkpoint.Damaged as e:
            skipped.append(f"{path.name} {e}" if str(e) == "missing" else f"{path.name} damaged ({e})")
            continue
        gap = records_gap(records, *reached(path, ck))
        if gap is None:
            return path, ck, skipped
        skipped.append(f"{path.name} is ahead of metrics.jsonl ({gap})")
    return None, None, skipped


def reached(path: Path, ck: dict) -> tuple:
    """(state, epoch records of that state) the records must hold for the loop at checkpoint `ck`."""
    if path.name.startswith("state_"):  # the end of a state: its record is written before it
        return ck["state"] + 1, 0
    return ck["state"], len(ck.get("history", []))


def records_gap(records: list, state: int, epochs: int) -> Optional[str]:
    """What metrics.jsonl lacks for the loop to continue at `state` after `epochs` of its epochs
    (a power loss can lose appends the checkpoint's rename survived); None when nothing."""
    done = {r["state"] for r in records if r.get("kind") == "state"}
    missing = [s for s in range(state) if s not in done]
    if missing:
        return f"it has no record of state {missing[0]}"
    have = sum(r.get("kind") == "epoch" and r.get("state") == state for r in records)
    return None if have >= epochs else f"it has {have} of the {epochs} epoch records of state {state} the checkpoint saw"


def rewind_point(ckpt_dir: Path) -> Optional[dict]:
    """The saved rewind point (rewind.pt) once the run has reached it, else None; raises
    checkpoint.Damaged when it is damaged (see rebuilt_rewind_point)."""
    path = ckpt_dir / "rewind.pt"
    return checkpoint.load(path) if path.is_file() else None


def rebuilt_rewind_point(ckpt_dir: Path, point: dict, write: bool = True) -> bool:
    """Whether `point` (θ0 rebuilt from the seed or the pretrained weights) is, byte for byte,
    the rewind.pt the run saved (its sidecar's checksum); if so it is written back (`write`)."""
    buffer = io.BytesIO()
    torch.save(point, buffer)
    path = ckpt_dir / "rewind.pt"
    if hashlib.sha256(buffer.getvalue()).hexdigest() not in checkpoint.recorded_checksums(path):
        return False
    if write:
        checkpoint.save(point, path)
    return True


def config_edits(config: dict, trained: dict) -> Optional[str]:
    """The first flag that config.json (`config`) sets otherwise than the checkpoint was trained
    with (`trained`), flags that may change on --resume aside: "--lr is 0.1, trained with 0.05"."""
    for key, value in trained.items():
        if key in FIELDS and key not in EXECUTION_FLAGS and key in config and config[key] != value:
            return f"--{key} is {config[key]!r} there, but the run was trained with {value!r}"
    return None


def where(path: Path, pos: Position) -> str:
    """Where a checkpoint puts the loop, in words."""
    if path.name.startswith("state_"):
        return f"the end of state {pos.state - 1}"
    if path.name.startswith("start_"):
        return f"the start of state {pos.state} (epoch {pos.next_epoch})"
    return f"state {pos.state}, epoch {pos.next_epoch}, step {pos.step}"


def what_was_lost(skipped: list, path: Path, pos: Position, dropped: int) -> str:
    """The line a resume from an older checkpoint than last.pt prints."""
    return (f"{'; '.join(skipped)}; resuming from {path.name}, {where(path, pos)}: "
            f"{dropped} epoch record{'s' * (dropped != 1)} after it dropped from metrics.jsonl and redone")
