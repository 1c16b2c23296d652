"""Reading runs for the report: a run folder (metrics.jsonl, config.json, summary.json) or a W&B
run's history, as one RunRecords."""
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from vitprune.config import NOT_ZEROED
from vitprune.errors import ConfigError
from vitprune.log import read_metrics, record_from_wandb
from vitprune.report.identity import NUMERICS, identity

# The headline number of a state is its FINAL PRUNED test accuracy (the network after the state's
# pruning, what one would deploy); the best-epoch accuracy (test accuracy at the epoch of best val
# accuracy) is shown beside it, labelled as such.
HEADLINE, BEST_EPOCH = "final_test_acc", "best_test_acc"


@dataclass
class RunRecords:
    """One run as its metrics records tell it (what train wrote, not a run to train)."""
    name: str
    config: dict
    status: str
    epochs: list = field(default_factory=list)  # epoch records in order
    states: list = field(default_factory=list)  # state records for states 0, 1, ... (no gaps)
    label: str = ""                             # its configuration's name in the tables
    summary: dict = field(default_factory=dict)  # summary.json's top level (resolved numerics, fingerprints)

    def acc(self, key=HEADLINE, n=None):
        return [s.get(key) for s in self.states[:n]]

    def state_epochs(self, state, key="val_acc"):
        return [e[key] for e in self.epochs if e["state"] == state and e.get(key) is not None]

    def recorded(self, key):
        """What the run recorded under `key`: summary.json's value, else the last state record's
        (a W&B run has no summary.json); None in records written before it was recorded."""
        found = [s[key] for s in self.states if s.get(key) is not None]
        return self.summary.get(key) if self.summary.get(key) is not None else (found[-1] if found else None)

    @cached_property  # the records do not change once loaded; identity is read many times
    def resolved(self) -> dict:
        """The numerics the run recorded as resolved (None each in records before they were)."""
        return {k: self.recorded(k) for k in NUMERICS}

    @cached_property
    def identity(self) -> dict:
        """What the run computes, seed aside (identity.identity): its completed configuration, how
        it retrains, its resolved numerics."""
        return identity(self.config, self.resolved)

    @property
    def split(self):
        """The fingerprint of its val and test images (None: recorded before it was)."""
        return self.recorded("split_fingerprint")

    def not_zeroed(self, state) -> bool:
        """RSST state whose targets were not driven to zero before the hard prune: judged on the
        largest target group's norm ratio (records before it was logged: on the aggregate)."""
        record = self.states[state] if state < len(self.states) else {}
        ratio = record.get("target_norm_ratio_max", record.get("target_norm_ratio"))
        return ratio is not None and ratio > NOT_ZEROED


def make_run(name, config, status, records, summary=None) -> RunRecords:
    """RunRecords from metrics records; a record written twice (resume) counts once, the last."""
    states = {r["state"]: r for r in records if r["kind"] == "state"}
    epochs = {(r["state"], r["epoch"]): r for r in records if r["kind"] == "epoch"}
    consecutive = []
    while len(consecutive) in states:
        consecutive.append(states[len(consecutive)])
    return RunRecords(name, config, status, [epochs[k] for k in sorted(epochs)], consecutive,
                      summary={k: v for k, v in (summary or {}).items() if k not in ("config", "last_state")})


def load_run(run_dir) -> RunRecords:
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise ConfigError(f"report: {run_dir} is not a run folder (no metrics.jsonl); give folders under --out_dir")
    summary = _read_json(run_dir / "summary.json")
    config = _read_json(run_dir / "config.json") or summary.get("config", {})
    return make_run(run_dir.name, config, summary.get("status", "unknown"), read_metrics(run_dir), summary)


def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def load_wandb_runs(project, entity=None) -> list:
    """The runs of a W&B project, rebuilt from their histories (names as logged by RunLog)."""
    import wandb
    runs = []
    for r in wandb.Api().runs(f"{entity}/{project}" if entity else project):
        records = [rec for rec in map(record_from_wandb, r.scan_history()) if rec]
        config = {k: v for k, v in dict(r.config).items() if not k.startswith("_")}
        runs.append(make_run(r.name, config, r.state, records, r.summary_metrics))  # RunLog's summary mirror
    return runs


def read_runs(run_dirs, wandb_project=None, wandb_entity=None, online=False) -> list:
    """The runs with at least one finished state, from run folders and (online) a W&B project."""
    runs = [load_run(d) for d in run_dirs]
    if wandb_project and online:
        runs += load_wandb_runs(wandb_project, wandb_entity)
    elif wandb_project:
        print(f"report: cannot read W&B project {wandb_project!r} offline (no credentials or WANDB_MODE); "
              f"using the run folders only")
    runs = deduplicate([r for r in runs if r.states])
    if not runs:
        raise ConfigError("report: no run with a finished state; give run folders (RUN_DIR...) "
                          "or --wandb_project with W&B online")
    return runs


def deduplicate(runs) -> list:
    """One run per (identity, seed): the same run read from a folder and from W&B, or two folders
    of one experiment (also one written before some flags existed and one after), count once (the
    one with the most states); one warning names them. Runs of different numerics never merge."""
    kept, dropped = {}, []
    for r in runs:
        key = (json.dumps(r.identity, sort_keys=True, default=str), str(r.config.get("seed")))
        if key in kept:
            keep, drop = (r, kept[key]) if len(r.states) > len(kept[key].states) else (kept[key], r)
            kept[key] = keep
            dropped.append(f"{drop.name} (= {keep.name})")
        else:
            kept[key] = r
    if dropped:
        print(f"report: warning: counted once, same configuration and seed: {', '.join(dropped)}")
    return [r for r in runs if any(r is k for k in kept.values())]
