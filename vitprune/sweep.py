"""Run a W&B grid sweep locally, one run after another.

The YAML is the one `wandb sweep` takes. Its `command:` must be `python -m vitprune run
${args}` (wandb's sweep-command helpers expand it; anything else is refused: `wandb agent` is
the tool for other commands), and every grid point runs `python -m vitprune run` with that
point's flags, `--out_dir` (and `--name` when two points would share a run folder).
Re-running the sweep skips finished runs and resumes an interrupted one; a folder that holds
another configuration stops the sweep before anything runs. Several runners may share one
--out_dir: a point whose folder another process holds (its lock, runfolder.py) is left to it
and looked at again at the end, so every point is trained once, and the last line says what
happened to every point.
"""
import itertools
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from vitprune.config import from_flags
from vitprune.errors import ConfigError, RunLocked
from vitprune.runfolder import NAME_FIELDS, config_difference, is_run_folder, run_name, saved_config, take_lock


def load_sweep(path) -> dict:
    try:
        sweep = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"sweep: cannot read {path}: {e}".replace("\n", " ")) from None
    if not isinstance(sweep, dict) or not isinstance(sweep.get("parameters"), dict):
        raise ConfigError(f"sweep: {path} has no `parameters:` mapping (see sweeps/smoke.yaml)")
    if sweep.get("method") != "grid":
        raise ConfigError(f"sweep: method {sweep.get('method')!r} in {path} needs the W&B sweep controller: "
                          f"run `wandb sweep {path}`, then `wandb agent ID`; `vitprune sweep` runs method: grid only")
    return sweep


def grid(sweep: dict) -> list:
    """All points of a grid sweep, as {flag: value}, in the order of the YAML's parameters."""
    names, choices = [], []
    for name, spec in sweep["parameters"].items():
        if isinstance(spec, dict) and "value" in spec:
            choices.append([spec["value"]])
        elif isinstance(spec, dict) and isinstance(spec.get("values"), list) and spec["values"]:
            choices.append(spec["values"])
        else:
            raise ConfigError(f"sweep: parameter {name!r} needs `value:` or a non-empty `values:` list for a grid")
        names.append(name)
    return [dict(zip(names, values)) for values in itertools.product(*choices)]


def agent_command(sweep: dict, point: dict, interpreter: str = "python") -> list:
    """The command `wandb agent` runs for one point (wandb_agent.Agent._command_run): the
    YAML's `command` with env-var macros filled by wandb, ${args} etc. from wandb's flags."""
    from wandb.sdk.launch.sweeps import utils
    command = utils.create_sweep_command(list(sweep.get("command") or utils.DEFAULT_SWEEP_COMMAND))
    macros = utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in point.items()}})
    macros.update(interpreter=[interpreter], program=[sweep.get("program")], env=["/usr/bin/env"])
    expanded = []
    for chunk in map(str, command):
        is_macro = chunk.startswith("${") and chunk.endswith("}")
        expanded += (macros.get(chunk[2:-1]) or []) if is_macro else [chunk]
    return expanded


def parse_run_flags(flags: list):
    """The Config that `python -m vitprune run FLAGS` gets: Fire parses, config validates."""
    import fire
    parsed = {}
    try:
        fire.Fire(lambda **kwargs: parsed.update(kwargs), command=list(flags), name="vitprune run")
    except fire.core.FireExit:
        raise ConfigError(f"sweep: Fire cannot parse the run flags {shlex.join(flags)}") from None
    return from_flags(parsed)


def plan(path, out_dir="runs") -> list:
    """(command, run folder, status) for every grid point (status: see _status)."""
    sweep = load_sweep(path)
    if "out_dir" in sweep["parameters"]:
        raise ConfigError(f"sweep: remove out_dir from the parameters of {path}; "
                          f"pass it as `vitprune sweep {path} --out_dir=DIR`")
    points = grid(sweep)
    commands = [agent_command(sweep, p, interpreter=sys.executable) + [f"--out_dir={out_dir}"] for p in points]
    configs = [parse_run_flags(_run_flags(c)) for c in commands]
    names = [run_name(c) for c in configs]
    if len(set(names)) < len(names):  # a grid over how to execute (e.g. precision): suffix what varies
        varying = [k for k in sweep["parameters"] if k not in NAME_FIELDS and len({str(p[k]) for p in points}) > 1]
        names = [n + "".join(f"_{k}{p[k]}".replace("/", "-") for k in varying) for n, p in zip(names, points)]
        commands = [c + [f"--name={n}"] for c, n in zip(commands, names)]
        if len(set(names)) < len(names):
            raise ConfigError(f"sweep: grid points of {path} repeat; every point must differ in some flag")
    runs = []
    for command, name, cfg in zip(commands, names, configs):
        run_dir = Path(out_dir) / name
        _check_same_experiment(run_dir, cfg)
        status = _status(run_dir)
        command = [sys.executable, "-m", "vitprune", "run", *_run_flags(command)]
        runs.append((command + _status_flags(status), run_dir, status))
    return runs


def _status_flags(status: str) -> list:
    return {"resume": ["--resume"], "restart": ["--overwrite"]}.get(status, [])


def _run_flags(command: list) -> list:
    """The flags of `[/usr/bin/env] PYTHON -m vitprune run FLAGS...`, the only command the local
    runner runs; ConfigError for any other command."""
    words = command[1:] if command[:1] == ["/usr/bin/env"] else command
    python = bool(words) and (words[0] == sys.executable or re.fullmatch(r"python[0-9.]*", words[0]))
    if not python or words[1:4] != ["-m", "vitprune", "run"] or not all(w.startswith("--") for w in words[4:]):
        raise ConfigError(f"sweep: `command:` must be `python -m vitprune run ${{args}}` (the local runner runs "
                          f"nothing else; `wandb agent` runs other commands), got {shlex.join(command)}")
    return words[4:]


def _check_same_experiment(run_dir: Path, cfg):
    """A folder that holds another experiment is never resumed, restarted or "finished, skipped"."""
    saved = saved_config(run_dir)
    differs = saved is not None and config_difference(saved, cfg.to_dict())
    if differs:
        raise ConfigError(f"sweep: run folder {run_dir} holds another configuration than this sweep's point: "
                          f"{differs}; give the sweep another --out_dir")


def _status(run_dir: Path) -> str:
    """new | finished | resume (has a checkpoint) | restart (died before its first checkpoint)."""
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return "new"
    try:
        if json.loads((run_dir / "summary.json").read_text()).get("status") == "finished":
            return "finished"
    except (OSError, json.JSONDecodeError):
        pass
    # any checkpoint: --resume falls back from a missing or damaged last.pt to the others
    return "resume" if any((run_dir / "checkpoints").glob("*.pt")) else "restart"


def _look(command: list, run_dir: Path, clear: bool = False):
    """(status, command) of a point as it is now, looked at under its folder's lock so that no
    runner reads a folder another is changing; status "elsewhere" when another process holds it.
    clear: about to run it, so a dead run's skeleton is emptied (and the point started as new)."""
    if not run_dir.parent.is_dir():  # no --out_dir yet: nothing to look at, nothing to lock
        return "new", command
    try:
        lock = take_lock(run_dir)
    except RunLocked:
        return "elsewhere", command
    base = [w for w in command if w not in ("--resume", "--overwrite")]
    try:
        status = _status(run_dir)
        if clear and status == "restart" and is_run_folder(run_dir):
            # Emptied here, under the lock, and started as new: a run started with --overwrite
            # would remove whatever another runner made of the point since this look.
            shutil.rmtree(run_dir)
            return status, base
    finally:
        lock.release()
    return status, base + _status_flags(status)


# What happened to a point, as the last line counts it.
OUTCOMES = ("trained here", "finished already", "finished by another runner", "running elsewhere", "failed")


def _run_point(i: int, n: int, command: list, run_dir: Path, first_pass: bool) -> str:
    """Run one point unless it is finished or held elsewhere; its outcome (OUTCOMES)."""
    status, command = _look(command, run_dir, clear=True)
    head = f"[{i}/{n}] {run_dir}"
    if status == "finished":
        print(f"# {head}: finished, skipped" if first_pass else f"# {head}: finished by another runner")
        return "finished already" if first_pass else "finished by another runner"
    if status == "elsewhere":
        print(f"# {head}: running elsewhere (another process holds it){'; back to it at the end' * first_pass}")
        return "running elsewhere"
    print(f"{head} ({status}): {shlex.join(command)}", flush=True)
    code = subprocess.run(command).returncode
    if code not in (0, RunLocked.EXIT_CODE) and status in ("new", "restart"):
        # Between this look and the run's own claim (python's start-up) another runner's run may
        # have taken the point: this run then refused a folder that was no longer what it looked.
        # Finished or held by another process now, it is that runner's point (looked at again at
        # the end); anything else is this run's failure.
        now = _look(command, run_dir)[0]
        if now == "finished" and not first_pass:
            return "finished by another runner"
        if now in ("finished", "elsewhere"):
            print(f"# {head}: taken by another runner meanwhile{'; back to it at the end' * first_pass}")
            return "running elsewhere"
    return {0: "trained here", RunLocked.EXIT_CODE: "running elsewhere"}.get(code, "failed")


def main(path, dry_run=False, out_dir="runs"):
    runs = plan(path, out_dir)
    if dry_run:
        for command, run_dir, status in runs:
            print(f"# {run_dir}: finished, skipped" if status == "finished" else shlex.join(command))
        return
    outcome = {}
    for i, (command, run_dir, _) in enumerate(runs, 1):
        outcome[run_dir] = _run_point(i, len(runs), command, run_dir, first_pass=True)
    for i, (command, run_dir, _) in enumerate(runs, 1):  # what another runner held: finished since, or died?
        if outcome[run_dir] == "running elsewhere":
            outcome[run_dir] = _run_point(i, len(runs), command, run_dir, first_pass=False)
    counts = [(k, sum(v == k for v in outcome.values())) for k in OUTCOMES]
    failed = [str(d) for d, v in outcome.items() if v == "failed"]
    print(f"sweep: {len(runs)} points: " + ", ".join(f"{n} {k}" for k, n in counts if n) +
          (f" ({', '.join(failed)}; run the sweep again to resume them)" if failed else ""),
          file=sys.stderr if failed else sys.stdout)
    if failed:
        raise SystemExit(1)
