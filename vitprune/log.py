"""Run logging: metrics.jsonl (the source of truth), summary.json, W&B, and the console.

metrics.jsonl holds one JSON object per line: {"kind": "epoch", ...} after every epoch and
{"kind": "state", ...} after every state; accuracies are in percent.

W&B mirrors every record under the same names (see `wandb_names`):
- epoch metrics keep their metrics.jsonl names (val_acc, train_loss, ...) and are plotted
  against `global_epoch`;
- state metrics are prefixed `state/` (state/final_test_acc, state/time_s, ...) because several
  names (time_s, target_norm_ratio) exist in both kinds, and are plotted against `state`.
W&B is a mirror only: any failure there warns once and training goes on.
"""
import json
import netrc
import os
import socket
import sys
import warnings
from pathlib import Path
from urllib.parse import urlparse

from vitprune import fmt
from vitprune.config import FIELDS, configuration, dataset_name
from vitprune.files import append_line, write_atomic, write_json

EPOCH_STEP = "global_epoch"
STATE_STEP = "state"
STATE_PREFIX = "state/"


def read_metrics(run_dir):
    """All records of a run folder's metrics.jsonl (a torn last line is ignored)."""
    path = Path(run_dir) / "metrics.jsonl"
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return records


def wandb_names(record: dict) -> dict:
    """The W&B row of a metrics.jsonl record: its numeric fields under their W&B names (the
    per-layer lists, heads_per_layer and mlp_widths, stay in metrics.jsonl)."""
    row = {}
    for key, value in record.items():
        if key == "kind" or not isinstance(value, (int, float)):
            continue
        if record["kind"] == "state" and key != STATE_STEP:
            key = STATE_PREFIX + key
        row[key] = value
    return row


def record_from_wandb(row: dict):
    """Inverse of `wandb_names` for one W&B history row (W&B's own `_step`, `_runtime`, ...
    are dropped); None for a row that is neither kind."""
    if any(k.startswith(STATE_PREFIX) for k in row):
        record = {"kind": "state", STATE_STEP: row.get(STATE_STEP)}
        record.update({k[len(STATE_PREFIX):]: v for k, v in row.items() if k.startswith(STATE_PREFIX)})
    elif EPOCH_STEP in row:
        record = {"kind": "epoch"}
        record.update({k: v for k, v in row.items() if not k.startswith("_")})
    else:
        return None
    return {k: v for k, v in record.items() if v is not None}


def has_wandb_credentials() -> bool:
    """Whether W&B could log in without a prompt: an API key or identity token in the
    environment, or a netrc entry for the W&B host (what `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_wandb_mode(mode: str) -> str:
    """auto: WANDB_MODE if set (as wandb itself does), else online with credentials, else offline."""
    if mode != "auto":
        return mode
    env = {"dryrun": "offline", "run": "online"}.get(os.environ.get("WANDB_MODE"), os.environ.get("WANDB_MODE"))
    if env in ("online", "offline", "disabled"):
        return env
    return "online" if has_wandb_credentials() else "offline"


def wandb_group(config: dict) -> str:
    """The W&B group of a run: dataset/method/rRATIO, then every other field of its
    configuration that differs from the default, so that a group holds seeds only."""
    c = configuration(config)
    rest = [f"{k}={v}" for k, v in c.items()
            if k not in ("dataset", "method", "ratio") and v != FIELDS[k].default]
    return "/".join([dataset_name(str(c.get("dataset"))), str(c.get("method")), f"r{c.get('ratio', 0):g}", *rest])


def _wandb_run_of(folder: Path):
    """The W&B run id another run folder logs to, None if it has none (or is gone)."""
    try:
        text = (folder / "wandb_id.txt").read_text().strip()
    except OSError:
        return None
    try:
        return json.loads(text).get("id")
    except (ValueError, AttributeError):
        return text


class RunLog:
    """Appends records to metrics.jsonl and mirrors them to W&B (one W&B run per run folder)."""

    def __init__(self, run_dir, config: dict, wandb_mode: str = "disabled", runtime: dict = None):
        self.run_dir = Path(run_dir)
        # How the run executes, as found at start-up rather than configured (e.g. the kernels
        # backend that passed its self-check): in summary.json and the W&B config and summary.
        self.runtime = dict(runtime or {})
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self.config = config
        self.wandb_mode = resolve_wandb_mode(wandb_mode)
        self.chosen_offline = wandb_mode == "offline" or os.environ.get("WANDB_MODE") in ("offline", "dryrun")
        self._warned = False
        self._defined = set()  # W&B metrics whose step metric is already declared
        self.records = len(read_metrics(self.run_dir))  # in metrics.jsonl; record i is W&B step i
        self.wandb_has = 0  # records the W&B run holds already (a resumed run): not logged again
        self.wandb_run = self._start_wandb() if self.wandb_mode != "disabled" else None

    def _warn(self, message: str):
        if not self._warned:  # one line: a filename linecache cannot read shows no source line
            warnings.warn_explicit(message, RuntimeWarning, "vitprune.log", 0)
            self._warned = True

    def _start_wandb(self):
        try:
            import wandb
        except Exception as e:  # a broken install must not stop training
            self._warn(f"W&B unavailable ({type(e).__name__}: {e}); logging to metrics.jsonl only")
            return None
        c = self.config
        run_id, copy = self._wandb_id()
        kwargs = dict(
            project=c.get("wandb_project") or "vitprune", entity=c.get("wandb_entity"),
            name=self.run_dir.name, config={**c, **self.runtime}, dir=str(self.run_dir), id=run_id, resume="allow",
            # the UI averages a group's runs (the seeds) and compares methods curve against curve
            group=wandb_group(c), job_type=c.get("method"),
            tags=[str(v) for v in (c.get("model"), c.get("dataset") and dataset_name(c["dataset"]), c.get("method"))
                  if v])
        error = None
        for mode in [self.wandb_mode] + (["offline"] if self.wandb_mode == "online" else []):
            try:
                run = wandb.init(mode=mode, **kwargs)
            except Exception as e:  # bad key, no network, service crash: fall back, never stop
                error = error or e
                continue
            here = {"id": run.id, "folder": str(self.run_dir.resolve()), "host": socket.gethostname()}
            write_json(self.run_dir / "wandb_id.txt", here)
            if run_id is not None:  # resumed: W&B has its steps 0 .. step-1 already
                self.wandb_has = int(getattr(run, "step", 0) or 0)
            if copy:
                print(f"W&B: {self.run_dir} is a copy of {copy[0]}, which logs to W&B run {copy[1]}: this copy logs "
                      f"to a W&B run of its own, {run.id}", file=sys.stderr)
            if error is not None:
                self._warn(f"W&B online failed ({type(error).__name__}: {error}); logging offline, "
                           f"upload later with `wandb sync {run.settings.sync_dir}`")
            elif mode == "offline":
                why = "" if self.chosen_offline or has_wandb_credentials() else \
                    " (no credentials: set WANDB_API_KEY or run `wandb login`)"
                print(f"W&B offline{why}; upload later with `wandb sync {run.settings.sync_dir}`", file=sys.stderr)
            return run
        self._warn(f"W&B stopped mirroring: init failed ({type(error).__name__}: {error}); "
                   f"metrics.jsonl holds every record")
        return None

    def _wandb_id(self):
        """(the W&B run this folder continues or None, (original folder, its W&B run) when the
        folder is a copy).
        A resumed run continues the run of its wandb_id.txt, also when the folder was moved (or
        taken to another machine); a copy resumed beside its original, which still holds that
        run, gets a run of its own. Under `wandb agent` the agent's WANDB_RUN_ID rules."""
        path = self.run_dir / "wandb_id.txt"
        if os.environ.get("WANDB_RUN_ID") or not path.is_file():
            return None, None
        text = path.read_text().strip()
        try:
            saved = json.loads(text)
        except ValueError:
            saved = {"id": text}  # written before copies were told apart: the id alone
        origin = Path(saved.get("folder") or self.run_dir)
        same_machine = saved.get("host", socket.gethostname()) == socket.gethostname()
        if same_machine and origin != self.run_dir.resolve() and _wandb_run_of(origin) == saved.get("id"):
            return None, (origin, saved["id"])
        return saved.get("id"), None

    def _wandb_log(self, record: dict):
        if self.wandb_run is None:
            return
        try:
            row = wandb_names(record)
            for key in row.keys() - self._defined:
                if key in (EPOCH_STEP, STATE_STEP):
                    self.wandb_run.define_metric(key)
                else:
                    step = STATE_STEP if key.startswith(STATE_PREFIX) else EPOCH_STEP
                    self.wandb_run.define_metric(key, step_metric=step)
                self._defined.add(key)
            self.wandb_run.log(row)
        except Exception as e:
            self._warn(f"W&B stopped mirroring: log failed ({type(e).__name__}: {e}); "
                       f"metrics.jsonl holds every record")
            self.wandb_run = None

    def truncate(self, state: int, next_epoch: int):
        """Keep only the records of the run before (state, next_epoch): used on resume, so the
        records of work after the last checkpoint, which is redone, are not duplicated.
        W&B keeps its rows, and the redone records it has already are not logged again.
        Returns the number of epoch records dropped."""
        records = read_metrics(self.run_dir)
        kept = [r for r in records
                if r["state"] < state or (r["state"] == state and r["kind"] == "epoch" and r["epoch"] < next_epoch)]
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.records = len(kept)
        return sum(r["kind"] == "epoch" for r in records) - sum(r["kind"] == "epoch" for r in kept)

    def _append(self, record: dict):
        append_line(self.path, json.dumps(record) + "\n")
        self.records += 1
        if self.records > self.wandb_has:
            self._wandb_log(record)

    def epoch(self, record: dict):
        self._append({"kind": "epoch", **record})

    def state(self, record: dict):
        self._append({"kind": "state", **record})

    def summary(self, summary: dict):
        """Write summary.json atomically and mirror its status to the W&B run summary."""
        summary = {**summary, **self.runtime}
        write_json(self.run_dir / "summary.json", summary)
        if self.wandb_run is not None:
            try:
                self.wandb_run.summary.update({k: summary[k] for k in ("status", "states_done", *self.runtime)
                                               if k in summary})
            except Exception as e:
                self._warn(f"W&B stopped mirroring: summary failed ({type(e).__name__}: {e}); "
                           f"metrics.jsonl holds every record")
                self.wandb_run = None

    def close(self, exit_code: int = 0):
        """Finish the W&B run (exit_code != 0 marks it failed in W&B)."""
        if self.wandb_run is not None:
            try:
                self.wandb_run.finish(exit_code=exit_code)
            except Exception as e:
                self._warn(f"W&B stopped mirroring: finish failed ({type(e).__name__}: {e}); "
                           f"metrics.jsonl holds every record")
            self.wandb_run = None


# ---- the console: what a run prints as it goes ------------------------------------------------

def structure_line(state: int, counts: dict, widths: dict) -> str:
    """What a state trains: alive heads/neurons per layer, the share of each removed, and
    parameters (structure.count's counts, structure.widths')."""
    c, w = counts, widths
    return (f"state {state}: {c['heads_alive']}/{c['heads_total']} heads (per layer {w['heads_per_layer']}, "
            f"{w['head_ratio_achieved']:.1%} removed), {c['neurons_alive']}/{c['neurons_total']} neurons (MLP widths "
            f"{w['mlp_widths']}, {w['mlp_ratio_achieved']:.1%} removed), "
            f"{c['params_alive'] / 1e6:.3f}M/{c['params_total'] / 1e6:.3f}M params alive "
            f"({c['flops_alive'] / c['flops_total']:.0%} of the FLOPs)")


def epoch_line(record: dict, rsst: bool, done: int, total: int, eta: float) -> str:
    """An epoch record as one line, with the run's progress (`done` of `total` epochs) and ETA."""
    reg = f" λ {record['reg_lambda']:.3g} ‖w_T‖ {record['target_norm_ratio']:.3f}" if rsst else ""
    return (f"state {record['state']} epoch {record['epoch']} | loss {record['train_loss']:.3f} "
            f"train {record['train_acc']:.1f}% val {record['val_acc']:.2f}% test {record['test_acc']:.2f}%{reg} | "
            f"{record['time_s']:.1f}s, {done}/{total} epochs, ETA {fmt.clock(eta)}")
