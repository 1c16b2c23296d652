"""A run's folder: its name, the hash of the configuration it holds, and claiming it.

A run folder is `--out_dir/NAME`, NAME derived from the configuration (RUN_NAME) unless
--name gives one. `claim` checks, once and before anything is written, that the folder may
be used as asked: a new run never goes into a folder that holds another configuration, or
into any used folder without --overwrite, and --resume needs a checkpoint there.
`RunFolder.prepare` then makes the folder (emptied first with --overwrite), once every
check that needs torch has passed. `resumed_config` rebuilds the configuration of a run
to resume from its config.json.
"""
import hashlib
import json
import shutil
import string
import sys
from pathlib import Path
from typing import Optional

from vitprune.config import EXECUTION_FLAGS, FIELDS, NUMERICS_FLAGS, Config, configuration, dataset_name, from_flags
from vitprune.errors import ConfigError

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


def saved_config(run_dir) -> Optional[dict]:
    """The config.json of a run folder, None when it has none (or an unreadable one)."""
    try:
        return json.loads((Path(run_dir) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


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
    """A run folder `claim` found fit for the run: `prepare` makes it."""

    def __init__(self, cfg: Config):
        self.cfg, self.path = cfg, run_dir(cfg)

    def prepare(self) -> Path:
        """Make the folder (and checkpoints/); a new run with --overwrite empties it first."""
        if not self.cfg.resume and self.cfg.overwrite and self.path.exists():
            shutil.rmtree(self.path)
        (self.path / "checkpoints").mkdir(parents=True, exist_ok=True)
        return self.path


def claim(cfg: Config) -> RunFolder:
    """The run folder, checked for what the run will do with it; ConfigError in one line when it
    may not: --resume without a checkpoint there, or a new run into a used folder (one holding
    another configuration, or without --overwrite)."""
    folder = RunFolder(cfg)
    path = folder.path
    if cfg.resume:
        if not any((path / "checkpoints").glob("*.pt")):
            raise ConfigError(f"--resume: no checkpoint at {path}/checkpoints/last.pt; start the run without --resume")
        return folder
    if path.exists() and any(path.iterdir()):
        saved = None if cfg.overwrite else saved_config(path)
        differs = saved is not None and config_difference(saved, cfg.to_dict())
        if differs:
            raise ConfigError(f"--name: run folder {path} holds another configuration: {differs}; "
                              f"choose another --name or --out_dir (--overwrite replaces it)")
        if not cfg.overwrite:
            raise ConfigError(f"--name: run folder {path} already exists; pass --resume to continue it "
                              f"or --overwrite to replace it")
    return folder


def resumed_config(cfg: Config, flags: dict) -> Optional[Config]:
    """The saved config of the run folder, with only execution flags taken from the command
    line's `flags`; None when the run has finished."""
    path = run_dir(cfg) / "config.json"
    if not path.is_file():
        raise ConfigError(f"--resume: no run folder with config.json at {path.parent}; check --out_dir and --name")
    saved = json.loads(path.read_text())
    summary = path.parent / "summary.json"
    if summary.is_file() and json.loads(summary.read_text()).get("status") == "finished":
        print(f"{path.parent} finished all its {saved.get('states')} states already: nothing to resume "
              f"(results in metrics.jsonl, summary.json)")
        return None
    missing = [k for k in FIELDS if k not in saved]
    if missing:
        raise ConfigError(f"--resume: {path} was written by an older vitprune (it has no --{missing[0]}); "
                          f"resume the run with that version or start a new one")
    for key in flags:
        if key not in EXECUTION_FLAGS and getattr(cfg, key) != saved[key]:
            raise ConfigError(f"--{key}: {getattr(cfg, key)!r} differs from {saved[key]!r} in {path}; "
                              f"a resumed run keeps its config (drop the flag or start a new run)")
    changed = [k for k in flags if k in NUMERICS_FLAGS and getattr(cfg, k) != saved[k]]
    if changed:
        print("warning: " + ", ".join(f"--{k} {saved[k]!r} -> {getattr(cfg, k)!r}" for k in changed) +
              " since the run started: the resumed numbers will not be bit-identical to an uninterrupted run",
              file=sys.stderr)
    saved.update({k: getattr(cfg, k) for k in EXECUTION_FLAGS if k in flags})
    saved["resume"] = True
    saved["name"] = run_name(cfg)
    return from_flags(saved)
