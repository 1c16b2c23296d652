"""Sweep YAMLs give `python -m vitprune run` the intended flags; the local grid runner."""
import json
import shlex
import sys
from pathlib import Path

import fire
import pytest
import yaml

from vitprune import sweep
from vitprune.config import from_flags
from vitprune.errors import ConfigError

SWEEPS = sorted((Path(__file__).parent.parent / "sweeps").glob("*.yaml"))
POINTS = [(path, point) for path in SWEEPS for point in sweep.grid(yaml.safe_load(path.read_text()))]


def command_of_wandb_agent(sweep_yaml, point, tmp_path, monkeypatch):
    """The command the real `wandb agent` starts for one point (its process launcher captured)."""
    from wandb import wandb_agent
    started = []

    class Launcher:  # stands in for the agent's subprocess
        def __init__(self, command=None, **kwargs):
            started.append(command)
    monkeypatch.setattr(wandb_agent, "AgentProcess", Launcher)
    for var in ("WANDB_RUN_ID", "WANDB_SWEEP_PARAM_PATH"):  # the agent sets them: restore after
        monkeypatch.setenv(var, "")
    monkeypatch.setenv("WANDB_SWEEP_ID", "sweep0")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    agent = wandb_agent.Agent(api=None, queue=None, sweep_id="sweep0")
    agent._sweep_command = sweep_yaml.get("command") or []
    agent._command_run({"run_id": "run0", "program": sweep_yaml.get("program"),
                        "args": {k: {"value": v} for k, v in point.items()}})
    return started[0]


def test_all_sweeps_found():
    assert {p.name for p in SWEEPS} >= {"seed.yaml", "ratio.yaml", "smoke.yaml", "iterative.yaml",
                                        "rsst_timing.yaml", "rsst_timing_cpu.yaml", "budget.yaml",
                                        "budget_retrain.yaml", "budget_finetune.yaml", "budget_cpu.yaml",
                                        "budget_retrain_cpu.yaml", "budget_finetune_cpu.yaml"}
    # seed, ratio and iterative over three seeds; smoke; RSST timing (3 reach × 2 shapes × 3 seeds,
    # twice); the budget sweeps per seed (3 and 2 seeds): 2 loops, 2 rewinds × 2 P, 2 fine-tunes
    assert len(POINTS) == 4 * 3 + 8 * 3 + 2 + 2 * 3 + 2 * 18 + (2 + 2 * 2 + 2) * (3 + 2)


def wandb_engine_points(sweep_yaml) -> list:
    """The grid points W&B's own sweep engine (the `sweeps` package the W&B server runs)
    proposes, one after another, until it says the grid is done."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydantic's deprecation notes about the package
        from sweeps import RunState, SweepRun, next_run, schema_violations_from_proposed_config
    assert schema_violations_from_proposed_config(sweep_yaml) == []
    runs = []
    while (proposed := next_run(sweep_yaml, runs, validate=True)) is not None:
        runs.append(SweepRun(name=f"run{len(runs)}", state=RunState.finished, config=proposed.config))
    return [{k: v["value"] for k, v in r.config.items()} for r in runs]


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_dry_run_runs_what_the_wandb_engine_proposes(path, tmp_path, capsys):
    proposed = wandb_engine_points(yaml.safe_load(path.read_text()))
    sweep.main(str(path), dry_run=True, out_dir=str(tmp_path))
    commands = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
    ran = [{k: v for k, v in vars(sweep.parse_run_flags(c[c.index("run") + 1:])).items()} for c in commands]
    want = [from_flags({**point, "out_dir": str(tmp_path)}) for point in proposed]
    key = lambda cfg: json.dumps({k: v for k, v in dict(cfg).items() if k != "name"}, sort_keys=True)
    assert sorted(map(key, ran)) == sorted(key(vars(c)) for c in want)
    assert len({tuple(c) for c in commands}) == len(proposed)  # every point once


@pytest.mark.parametrize("path,point", POINTS, ids=[f"{p.stem}-{'-'.join(map(str, pt.values()))}" for p, pt in POINTS])
def test_agent_command_parses_into_the_grid_point(path, point, tmp_path, monkeypatch):
    sweep_yaml = yaml.safe_load(path.read_text())
    command = sweep.agent_command(sweep_yaml, point)
    assert command == command_of_wandb_agent(sweep_yaml, point, tmp_path, monkeypatch)
    assert command[:5] == ["/usr/bin/env", "python", "-m", "vitprune", "run"]
    assert command[5:] == [f"--{k}={v}" for k, v in point.items()]

    def capture_fn(**flags):  # what `python -m vitprune run` does with its flags
        captured.append(from_flags(flags))
    captured = []
    fire.Fire(capture_fn, command=command[5:])
    cfg = captured[0]
    for flag, value in point.items():
        assert getattr(cfg, flag) == value and type(getattr(cfg, flag)) is type(value), flag


def test_seed_sweep_is_the_seeds_experiment():
    points = sweep.grid(yaml.safe_load((Path(__file__).parent.parent / "sweeps" / "seed.yaml").read_text()))
    cfgs = [from_flags(p) for p in points]
    assert {(c.method, c.dataset) for c in cfgs} == {(m, d) for m in ("refill", "rsst")
                                                     for d in ("cifar10", "cifar100")}
    assert all((c.model, c.ratio, c.states, c.epochs) == ("vit_small", 0.7, 16, 60) for c in cfgs)


def write_sweep(tmp_path, text):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return path


GRID = """
method: grid
parameters:
  method: {values: [refill, rsst]}
  dataset: {value: synthetic}
  lr: {values: [0.01, 0.001]}
command: ["${interpreter}", -m, vitprune, run, "${args}"]
"""


def test_local_runner_skips_finished_resumes_interrupted(tmp_path, monkeypatch, capsys):
    path = write_sweep(tmp_path, GRID)
    out = tmp_path / "runs"
    runs = sweep.plan(path, out)
    names = [r[1].name for r in runs]
    # lr is not shown in the default run name, but the configuration's hash tells the points apart
    assert [n.rsplit("_", 1)[0] for n in names] == ["synthetic_refill_vit_small_r0.7_s0"] * 2 + \
        ["synthetic_rsst_vit_small_r0.7_s0"] * 2
    assert len(set(names)) == 4 and runs[0][0][-1] == f"--out_dir={out}"
    (out / names[0]).mkdir(parents=True)
    (out / names[0] / "summary.json").write_text(json.dumps({"status": "finished"}))
    (out / names[1] / "checkpoints").mkdir(parents=True)
    (out / names[1] / "checkpoints" / "last.pt").write_bytes(b"")
    (out / names[1] / "summary.json").write_text(json.dumps({"status": "running"}))
    (out / names[2]).mkdir()
    point = sweep.parse_run_flags(sweep._run_flags(runs[2][0])).to_dict()
    (out / names[2] / "config.json").write_text(json.dumps(point))  # died before its first checkpoint
    (out / names[3]).mkdir()  # empty
    ran, there = [], []
    monkeypatch.setattr(sweep.subprocess, "run", lambda cmd: ran.append(cmd) or there.append(
        (out / names[2]).exists()) or type("P", (), {"returncode": 0}))
    sweep.main(str(path), out_dir=str(out))
    # the dead run's folder is emptied by the runner under its lock, and the point started as new
    assert [c[-1] for c in ran] == ["--resume", f"--out_dir={out}", f"--out_dir={out}"] and there[1:] == [False, False]
    assert ran[0][:5] == [sys.executable, "-m", "vitprune", "run", "--method=refill"]
    assert "finished, skipped" in capsys.readouterr().out


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_folder_of_another_configuration_is_refused(tmp_path, monkeypatch, capsys):
    from conftest import run_cli
    path = write_sweep(tmp_path, GRID)
    out = tmp_path / "runs"
    command, run_dir, _ = sweep.plan(path, out)[1]
    saved = {**sweep.parse_run_flags(sweep._run_flags(command)).to_dict(), "lr": 0.05}  # another experiment
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(saved))
    (run_dir / "summary.json").write_text(json.dumps({"status": "finished"}))
    before = snapshot(out)
    monkeypatch.setattr(sweep.subprocess, "run", lambda cmd: pytest.fail("a run started"))
    capsys.readouterr()
    assert run_cli(monkeypatch, "sweep", path, f"--out_dir={out}") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{run_dir} holds another configuration" in err and "--lr=0.001" in err
    assert snapshot(out) == before and "finished, skipped" not in err
    # `run` into that folder by name: refused before torch loads, the folder untouched
    flags = [f for f in sweep._run_flags(command) if not f.startswith("--out_dir")]
    assert run_cli(monkeypatch, "run", *flags, f"--out_dir={out}", f"--name={run_dir.name}", "--wandb=disabled") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds another configuration: --lr=0.001 (the folder has 0.05)" in err
    assert snapshot(out) == before


def test_dry_run_prints_commands_only(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sweep.subprocess, "run", lambda cmd: pytest.fail("dry run started a run"))
    sweep.main(str(write_sweep(tmp_path, GRID)), dry_run=True, out_dir=str(tmp_path))
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and all(" -m vitprune run --method=" in line for line in lines)


def test_failed_run_exits_nonzero_after_the_rest(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(sweep.subprocess, "run", lambda cmd: ran.append(cmd) or type("P", (), {"returncode": 1}))
    with pytest.raises(SystemExit):
        sweep.main(str(write_sweep(tmp_path, GRID)), out_dir=str(tmp_path))
    assert len(ran) == 4


@pytest.mark.parametrize("text,match", [
    ("method: bayes\nparameters: {lr: {min: 0.001, max: 0.1}}\n", "wandb agent"),
    ("method: grid\nparameters: {lr: {min: 0.001, max: 0.1}}\n", "'lr' needs `value:`"),
    ("method: grid\n", "no `parameters:`"),
    ("method: grid\nparameters: {method: {values: [prune_all]}}\ncommand: [python, -m, vitprune, run, '${args}']\n",
     "--method: unknown value 'prune_all'"),
    ("method: grid\nparameters: {out_dir: {value: x}}\n", "remove out_dir"),
    ("method: grid\nparameters: {lr: {value: 0.1}}\ncommand: [python, train.py, '${args}']\n", "must be `python -m"),
    # words that contain `vitprune run` but run a shell: refused, nothing runs
    ("method: grid\nparameters: {lr: {value: 0.1}}\ncommand: [/bin/sh, -c, 'touch pwned', vitprune, run, '${args}']\n",
     "must be `python -m"),
    ("method: grid\nparameters: {lr: {value: 0.1}}\ncommand: [python, -m, vitprune, run, '${args}', ';', rm]\n",
     "must be `python -m"),
])
def test_bad_sweeps_raise_one_line(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match) as e:
        sweep.main(str(write_sweep(tmp_path, text)), dry_run=True, out_dir=str(tmp_path))
    assert "\n" not in str(e.value)


def test_a_sweep_command_that_is_not_vitprune_run_runs_nothing(tmp_path, monkeypatch):
    """The local runner runs `python -m vitprune run FLAGS` only: a YAML whose command merely
    contains those words (a shell here) is refused, and its command never runs."""
    monkeypatch.chdir(tmp_path)
    text = "method: grid\nparameters: {lr: {value: 0.1}}\ncommand: [/bin/sh, -c, 'touch pwned', vitprune, run]\n"
    with pytest.raises(ConfigError, match="must be `python -m vitprune run"):
        sweep.main(str(write_sweep(tmp_path, text)), out_dir=str(tmp_path / "runs"))
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "runs").exists()


def test_missing_sweep_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        sweep.main(str(tmp_path / "nope.yaml"))


@pytest.mark.slow
def test_smoke_sweep_end_to_end(tmp_path, monkeypatch, capsys):
    """The real thing: sweeps/smoke.yaml runs (W&B offline) and `report` summarises it.
    The slowest test (a few minutes on 2 CPU cores); CI runs it."""
    from vitprune import report
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    smoke = Path(__file__).parent.parent / "sweeps" / "smoke.yaml"
    out = tmp_path / "runs"
    sweep.main(str(smoke), out_dir=str(out))
    run_dirs = sorted(out.iterdir())
    points = sweep.grid(yaml.safe_load(smoke.read_text()))
    assert len(run_dirs) == len(points)
    for run_dir in run_dirs:
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "finished" and summary["states_done"] == points[0]["states"]
        assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    sweep.main(str(smoke), out_dir=str(out))  # again: everything is finished, nothing runs
    assert capsys.readouterr().out.count("finished, skipped") == len(points)
    md = tmp_path / "report" / "smoke.md"
    report.main(*map(str, run_dirs), out=str(md))
    text = md.read_text()
    assert "## synthetic" in text and "**Key result**" in text
    assert all(f"**{d.name}**" in text for d in run_dirs)
    compute = "train_flops" in (run_dirs[0] / "metrics.jsonl").read_text()  # records with compute: its figure too
    rsst = any(json.loads((d / "config.json").read_text())["method"] == "rsst" for d in run_dirs)
    assert {p.name for p in md.parent.glob("*.png")} == {"smoke_synthetic_states.png", "smoke_synthetic_epochs.png",
                                                         *["smoke_compute.png"] * compute,
                                                         *["smoke_synthetic_rsst0.png"] * rsst}


TWO_SCHEDULES = """
method: grid
parameters:
  method: {{values: [refill, rsst]}}
  dataset: {{value: synthetic}}
  model: {{value: vit_micro}}
  states: {{value: 2}}
  epochs: {{value: 1}}
  batch_size: {{value: 32}}
  optimizer: {{value: adamw}}
  lr: {{value: 0.001}}
  wandb: {{value: disabled}}
  schedule: {{value: {schedule}}}
command: ["${{interpreter}}", -m, vitprune, run, "${{args}}"]
"""


@pytest.mark.slow
def test_two_sweeps_that_differ_in_schedule_share_an_out_dir(tmp_path, monkeypatch, capsys):
    """The same points but for `schedule` used to share run folders (the second sweep then said
    "finished, skipped"). Each run executes `python -m vitprune run ...` in this process, on a
    small synthetic set, so that the test stays short."""
    from conftest import run_cli, small_data
    from vitprune import report, runtime
    monkeypatch.setattr(runtime, "load_data", small_data((64, 16, 16)))
    monkeypatch.setattr(sweep.subprocess, "run", lambda cmd: type("P", (), {"returncode": run_cli(monkeypatch, *cmd[3:])}))
    out = tmp_path / "runs"
    paths = {s: tmp_path / f"{s}.yaml" for s in ("oneshot", "geometric")}
    for schedule, path in paths.items():
        path.write_text(TWO_SCHEDULES.format(schedule=schedule))
        sweep.main(str(path), out_dir=str(out))
    assert "skipped" not in capsys.readouterr().out
    folders = {s: [run_dir for _, run_dir, _ in sweep.plan(p, out)] for s, p in paths.items()}
    assert len(set(folders["oneshot"] + folders["geometric"])) == 4 == len(list(out.iterdir()))
    for schedule, run_dirs in folders.items():
        for run_dir in run_dirs:
            assert json.loads((run_dir / "config.json").read_text())["schedule"] == schedule
            assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"
    sweep.main(str(paths["geometric"]), out_dir=str(out))  # again: its own two runs are finished
    assert capsys.readouterr().out.count("finished, skipped") == 2
    md = tmp_path / "r.md"
    report.main(*map(str, out.iterdir()), out=str(md))
    text = md.read_text()
    assert "## synthetic — oneshot" in text and "## synthetic — geometric" in text
    for schedule, run_dirs in folders.items():  # each section holds its own sweep's runs
        section = text.split(f"## synthetic — {schedule}")[1].split("\n## ")[0]
        assert all(f"**{d.name}**" in section for d in run_dirs)
        assert not any(f"**{d.name}**" in section for s, ds in folders.items() if s != schedule for d in ds)
