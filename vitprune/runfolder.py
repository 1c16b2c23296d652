"""A run's folder: its name, the hash of the configuration it holds, and claiming it.

A run folder is `--out_dir/NAME`, NAME derived from the configuration (RUN_NAME) unless
--name gives one. `claim` takes the folder's lock (the lock file `.NAME.lock` beside the
folder, held while the run lives, released by the OS when it dies; under torchrun the first
process holds it; when --out_dir does not exist yet, when the folder is made), then checks, once and before anything is written, that the folder may be
used as asked: a new run never goes into a folder that holds another configuration, or into
any used folder without --overwrite; --overwrite replaces only a vitprune run folder; --resume
needs the folder's config.json. `RunFolder.prepare` then makes the folder (emptied first with
--overwrite), once every check that needs torch has passed. `resumed_config` rebuilds the
configuration of a run to resume from its config.json, written where the folder is now.
"""
import hashlib
import json
import shutil
import os
import string
import sys
from pathlib import Path
from typing import Optional

from vitprune.config import (EXECUTION_FLAGS, FIELDS, METHODS, NUMERICS_FLAGS, Config, complete, configuration,
                             dataset_name, from_flags)
from vitprune.errors import ConfigError, RunLocked
from vitprune.files import Lock, Locked, write_json

# The default run folder name; the fields it shows are the ones that tell runs apart by name.
# The hash stands for every other field that applies and changes what is computed, so that two
# experiments that differ in a field the name does not show (schedule, lr...) never share a folder.
RUN_NAME = "{dataset}_{method}_{model}_r{ratio:g}_s{seed}_{hash}"
NAME_FIELDS = tuple(name for _, name, _, _ in string.Formatter().parse(RUN_NAME) if name in FIELDS)


def config_hash(config: dict) -> str:
    """6 hex digits of the configuration (seed aside: the name shows it). Only the fields that
    differ from their defaults enter, so a new flag whose default keeps the old behaviour leaves
    the names of existing runs (and a sweep's "finished, skipped") as they were."""
    changed = {k: v for k, v in configuration(config).items() if v != FIELDS[k].default}
    text = json.dumps(changed, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:6]


def run_name(cfg: Config) -> str:
    """The run folder's name: --name, else RUN_NAME filled from the configuration."""
    config = cfg.to_dict()
    return cfg.name or RUN_NAME.format(**{**config, "dataset": dataset_name(cfg.dataset),
                                          "hash": config_hash(config)})


def run_dir(cfg: Config) -> Path:
    return Path(cfg.out_dir) / run_name(cfg)


def read_json(path: Path) -> Optional[dict]:
    """A run folder's JSON file (config.json, summary.json); None when there is none, ConfigError
    in one line when it is not a JSON object (a hand edit gone wrong)."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not readable as JSON ({str(e).splitlines()[0][:80]}); fix the file or "
                          f"restore it from a copy") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: holds {type(value).__name__}, not a JSON object; fix the file")
    return value


def saved_config(run_dir) -> Optional[dict]:
    """The config.json of a run folder, None when it has none."""
    return read_json(Path(run_dir) / "config.json")


def lock_path(run_dir: Path) -> Path:
    """The lock file of a run folder: beside it, where --overwrite does not remove it."""
    return run_dir.parent / f".{run_dir.name}.lock"


# What a run that died before writing config.json leaves (older versions: W&B's files too).
SKELETON = {"checkpoints", "wandb", "wandb_id.txt"}


def is_run_folder(path: Path) -> bool:
    """Whether --overwrite may remove `path`: its config.json is a vitprune config, or it is the
    skeleton of a run that died before writing one (no checkpoint in it)."""
    try:
        saved = saved_config(path)
    except ConfigError:
        return False
    if saved is not None:
        return saved.get("method") in METHODS and "dataset" in saved
    return {p.name for p in path.iterdir()} <= SKELETON and not any((path / "checkpoints").rglob("*"))


def config_difference(saved: dict, requested: dict) -> Optional[str]:
    """The first field, seed included, in which a run folder's saved config computes something
    other than the requested one ("--lr=0.001 (the folder has 0.01)"), or None."""
    full = lambda c: {**{k: f.default for k, f in FIELDS.items()}, **c}
    saved, requested = full(saved), full(requested)
    ours, theirs = configuration(requested), configuration(saved)
    for k in [*dict.fromkeys([*ours, *theirs]), "seed"]:
        if json.dumps(ours.get(k, requested[k])) != json.dumps(theirs.get(k, saved[k])):
            return f"--{k}={requested[k]} (the folder has {saved[k]})"
    return None


class RunFolder:
    """A run folder `claim` found fit for the run, and its lock (None: not held here, as on the
    processes of torchrun other than the first). `prepare` makes the folder."""

    def __init__(self, cfg: Config, lock: Optional[Lock] = None, claim_here: bool = False):
        self.cfg, self.path, self.lock, self.claim_here = cfg, run_dir(cfg), lock, claim_here

    def prepare(self) -> Path:
        """Make the folder (and checkpoints/) and write a new run's config.json first, so that a
        folder without one is only the skeleton; --overwrite empties a used folder first. A folder
        whose --out_dir did not exist at `claim` is claimed here, once there is a place to lock."""
        if self.lock is None and self.claim_here:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.lock = take_lock(self.path)
            try:
                check(self.cfg, self.path)
            except BaseException:
                self.release()
                raise
        if not self.cfg.resume and self.cfg.overwrite and self.path.exists():
            shutil.rmtree(self.path)
        (self.path / "checkpoints").mkdir(parents=True, exist_ok=True)
        if not self.cfg.resume:
            write_json(self.path / "config.json", self.cfg.to_dict())
        return self.path

    def release(self):
        if self.lock is not None:
            self.lock.release()

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, *exc):
        self.release()


def take_lock(path: Path) -> Lock:
    """The run folder's lock, or RunLocked naming its holder."""
    try:
        return Lock(lock_path(path)).acquire(blocking=False)
    except Locked as e:
        raise RunLocked(f"run folder {path} is in use by {e}; wait for that run to end, or choose another "
                        f"--name or --out_dir") from None


def claim(cfg: Config) -> RunFolder:
    """Take the run folder's lock and check it for what the run will do with it; ConfigError in
    one line when it may not be used so, RunLocked when another process holds it."""
    path = run_dir(cfg)
    if int(os.environ.get("RANK", "0")) > 0:  # torchrun: the first process holds and checks the folder
        return RunFolder(cfg)
    if not path.parent.is_dir():  # nothing there to check, and no place to lock without writing one
        check(cfg, path)
        return RunFolder(cfg, claim_here=True)
    folder = RunFolder(cfg, take_lock(path))
    try:
        check(cfg, path)
    except BaseException:
        folder.release()
        raise
    return folder


def check(cfg: Config, path: Path):
    """ConfigError unless the folder may be used as `cfg` asks (see the module's docstring)."""
    if cfg.resume:
        if saved_config(path) is None:
            raise ConfigError(f"--resume: no run folder with config.json at {path}; check --out_dir and --name")
        return
    if not path.exists() or not any(path.iterdir()):
        return
    if not path.is_dir():
        raise ConfigError(f"--name: {path} is a file, not a run folder; choose another --name or --out_dir")
    if cfg.overwrite:
        if not is_run_folder(path):
            raise ConfigError(f"--overwrite: {path} is not a vitprune run folder (no vitprune config.json); "
                              f"nothing was removed; choose another --name or --out_dir")
        return
    saved = saved_config(path)
    differs = saved is not None and config_difference(saved, cfg.to_dict())
    if differs:
        raise ConfigError(f"--name: run folder {path} holds another configuration: {differs}; "
                          f"choose another --name or --out_dir (--overwrite replaces it)")
    raise ConfigError(f"--name: run folder {path} already exists; pass --resume to continue it "
                      f"or --overwrite to replace it")


def resumed_config(cfg: Config, flags: dict) -> Optional[Config]:
    """The saved config of the run folder, with only execution flags taken from the command
    line's `flags`, and --out_dir where the folder is now (it may have been moved or copied);
    None when the run has finished."""
    path = run_dir(cfg) / "config.json"
    saved = read_json(path)
    if saved is None:
        raise ConfigError(f"--resume: no run folder with config.json at {path.parent}; check --out_dir and --name")
    missing = [k for k in FIELDS if k not in saved]
    if missing:  # written before these flags existed: the run ran with their values of then
        saved = {k: v for k, v in complete(saved).items() if k in FIELDS}
    for key in flags:
        if key not in EXECUTION_FLAGS and getattr(cfg, key) != saved[key]:
            raise ConfigError(f"--{key}: {getattr(cfg, key)!r} differs from {saved[key]!r} in {path}; "
                              f"a resumed run keeps its config (drop the flag or start a new run)")
    summary = read_json(path.parent / "summary.json") or {}
    if summary.get("status") == "finished":
        print(f"{path.parent} finished all its {saved.get('states')} states already: nothing to resume "
              f"(results in metrics.jsonl, summary.json)")
        return None
    if missing:
        print(f"note: {path} predates " + ", ".join(f"--{k}" for k in missing) +
              ": the run continues with their values from before they existed", file=sys.stderr)
    changed = [k for k in flags if k in NUMERICS_FLAGS and getattr(cfg, k) != saved[k]]
    if changed:
        print("warning: " + ", ".join(f"--{k} {saved[k]!r} -> {getattr(cfg, k)!r}" for k in changed) +
              " since the run started: the resumed numbers will not be bit-identical to an uninterrupted run",
              file=sys.stderr)
    saved.update({k: getattr(cfg, k) for k in EXECUTION_FLAGS if k in flags})
    saved.update(resume=True, name=run_name(cfg), out_dir=cfg.out_dir)  # the folder is written where it is
    return from_flags(saved)
