"""Many processes on one machine, run folders passed between people: a run folder is held by
one process (its lock), `--overwrite` removes only a vitprune run folder, sweep runners that
share an --out_dir train every point once and say what happened, and a received folder is data:
its checkpoints load without pickle, and it resumes where it is."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import class_folders, run_cli
from vitprune import runfolder, sweep
from vitprune.config import Config
from vitprune.errors import ConfigError, RunLocked
from vitprune.files import Lock

RUNNER = Path(__file__).with_name("fault_runner.py")
REPO = Path(__file__).parent.parent


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def cfg(out, **flags):
    return Config(**{"dataset": "synthetic", "model": "vit_micro", "out_dir": str(out), "name": "r",
                     "wandb": "disabled", **flags})


# ---- the lock ---------------------------------------------------------------------------------

def test_a_held_run_folder_is_refused_naming_its_holder(tmp_path, monkeypatch, capsys):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.json").write_text(json.dumps(cfg(tmp_path).to_dict()))
    held = runfolder.take_lock(tmp_path / "r")  # another process's run, as far as flock can tell
    before = snapshot(tmp_path / "r")
    for more in (["--resume"], ["--overwrite"], []):
        capsys.readouterr()
        code = run_cli(monkeypatch, "run", "--dataset=synthetic", "--model=vit_micro", f"--out_dir={tmp_path}",
                       "--name=r", "--wandb=disabled", *more)
        err = capsys.readouterr().err
        assert code == RunLocked.EXIT_CODE == 73, (more, err)
        assert err.count("\n") == 1 and f"run folder {tmp_path / 'r'} is in use by host " in err
        assert f"pid {os.getpid()}, since " in err
    assert snapshot(tmp_path / "r") == before
    held.release()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    code = (f"import os, signal, sys; sys.path.insert(0, {str(REPO)!r}); from vitprune.files import Lock; "
            f"Lock({str(tmp_path / '.r.lock')!r}).acquire(); os.kill(os.getpid(), signal.SIGKILL)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == -9
    assert (tmp_path / ".r.lock").exists()  # its file stays, its lock went with the process
    runfolder.take_lock(tmp_path / "r").release()


def test_two_holders_never(tmp_path):
    """A process that got the lock of a file its holder removed on release locks the current file."""
    first = Lock(tmp_path / "x.lock").acquire()
    with pytest.raises(Exception):
        Lock(tmp_path / "x.lock").acquire(blocking=False)
    first.release()
    assert not (tmp_path / "x.lock").exists()  # removed while still held
    second = Lock(tmp_path / "x.lock").acquire(blocking=False)
    with pytest.raises(Exception):
        Lock(tmp_path / "x.lock").acquire(blocking=False)
    second.release()


def test_a_filesystem_without_locks_is_said_in_one_line_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    (tmp_path / "out").mkdir()
    folder = runfolder.claim(cfg(tmp_path / "out"))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not support file locks (ENOLCK)" in err
    assert not folder.lock.locked
    folder.prepare()
    assert (tmp_path / "out" / "r" / "config.json").is_file()


def test_the_lock_outlives_an_overwrite(tmp_path):
    folder = runfolder.claim(cfg(tmp_path, overwrite=True))
    folder.prepare()
    (tmp_path / "r" / "metrics.jsonl").write_text("")
    folder.prepare()  # --overwrite empties the folder: the lock, beside it, stays held
    with pytest.raises(RunLocked):
        runfolder.claim(cfg(tmp_path, overwrite=True))
    folder.release()


# ---- --overwrite removes only a vitprune run folder ------------------------------------------

@pytest.mark.parametrize("contents", ["thesis", "decode cache", "a foreign config.json", "broken config.json"])
def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path, monkeypatch, capsys, contents):
    target = tmp_path / "r"
    target.mkdir()
    if contents == "thesis":
        (target / "thesis.tex").write_text("\\chapter{Results}")
    elif contents == "decode cache":
        (target / "decoded").mkdir()
        (target / "decoded" / "flowers_32px_0123.pt").write_bytes(b"tensors")
    elif contents == "a foreign config.json":
        (target / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 768}))
    else:
        (target / "config.json").write_text("{not json")
    before = snapshot(target)
    code = run_cli(monkeypatch, "run", "--dataset=synthetic", "--model=vit_micro", f"--out_dir={tmp_path}",
                   "--name=r", "--wandb=disabled", "--overwrite")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--overwrite" in err and "not a vitprune run folder" in err, err
    assert snapshot(target) == before


def test_overwrite_replaces_a_run_folder_and_the_skeleton_of_one(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(cfg(tmp_path).to_dict()))
    (run / "metrics.jsonl").write_text('{"kind": "epoch"}\n')
    skeleton = tmp_path / "skeleton"
    (skeleton / "checkpoints").mkdir(parents=True)  # died before writing config.json
    for name in ("run", "skeleton"):
        with runfolder.claim(cfg(tmp_path, name=name, overwrite=True)) as folder:
            folder.prepare()
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == ["checkpoints", "config.json"]


# ---- sweep runners sharing an --out_dir ------------------------------------------------------

GRID = """
method: grid
parameters:
  method: {values: [refill, rsst]}
  dataset: {value: synthetic}
command: ["${interpreter}", -m, vitprune, run, "${args}"]
"""


def write_grid(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(GRID)
    return path


def fake_runs(monkeypatch, codes=None):
    ran = []

    def run(cmd):
        ran.append(cmd)
        return type("P", (), {"returncode": (codes or {}).get(len(ran), 0)})
    monkeypatch.setattr(sweep.subprocess, "run", run)
    return ran


def test_a_runner_leaves_a_point_another_process_holds(tmp_path, monkeypatch, capsys):
    """Another runner's run has claimed point 1 and not checkpointed yet: this runner neither
    restarts it (--overwrite would remove it) nor counts it as failed."""
    path, out = write_grid(tmp_path), tmp_path / "runs"
    (command, held_dir, _), (_, other_dir, _) = sweep.plan(path, out)
    held_dir.mkdir(parents=True)
    (held_dir / "config.json").write_text(json.dumps(sweep.parse_run_flags(sweep._run_flags(command)).to_dict()))
    (held_dir / "checkpoints").mkdir()
    before = snapshot(held_dir)
    lock = runfolder.take_lock(held_dir)
    ran = fake_runs(monkeypatch)
    sweep.main(str(path), out_dir=str(out))
    lock.release()
    assert [c[4] for c in ran] == ["--method=rsst"]  # only the free point ran
    assert snapshot(held_dir) == before
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "sweep: 2 points: 1 trained here, 1 running elsewhere", lines


def test_a_run_that_finds_its_point_held_is_running_elsewhere_not_failed(tmp_path, monkeypatch, capsys):
    """Two runners started at once: this runner's child finds the point taken (exit 73)."""
    path, out = write_grid(tmp_path), tmp_path / "runs"
    fake_runs(monkeypatch, codes={1: RunLocked.EXIT_CODE, 3: RunLocked.EXIT_CODE})  # and when looked at again
    sweep.main(str(path), out_dir=str(out))  # no SystemExit: nothing failed
    captured = capsys.readouterr()
    assert "failed" not in captured.out + captured.err
    assert captured.out.splitlines()[-1] == "sweep: 2 points: 1 trained here, 1 running elsewhere"


@pytest.mark.parametrize("looked", ["new", "restart"])
def test_a_point_taken_between_the_look_and_the_runs_claim_is_not_failed(tmp_path, monkeypatch, capsys, looked):
    """Two runners at one point: this runner looks (free: new, or a dead run's skeleton) and starts
    its run; before that run claims the folder (python's start-up, seconds) another runner's run
    takes the point and finishes it. This run then refuses the folder, which is no longer what it
    looked (exit 2): it removes nothing (no --overwrite), and the runner says what happened to the
    point, not that it failed."""
    path, out = write_grid(tmp_path), tmp_path / "runs"
    (command, first, _), _ = sweep.plan(path, out)
    if looked == "restart":  # a run that died before its first checkpoint
        (first / "checkpoints").mkdir(parents=True)
        (first / "config.json").write_text(json.dumps(sweep.parse_run_flags(sweep._run_flags(command)).to_dict()))
    calls = []

    def run(cmd):
        calls.append(cmd)
        if len(calls) == 1:  # meanwhile the other runner's run finished the point
            assert "--overwrite" not in cmd  # it would remove the other runner's finished run
            (first / "checkpoints").mkdir(parents=True)
            (first / "config.json").write_text(json.dumps(sweep.parse_run_flags(sweep._run_flags(cmd)).to_dict()))
            (first / "summary.json").write_text(json.dumps({"status": "finished"}))
            return type("P", (), {"returncode": run_cli(monkeypatch, *cmd[cmd.index("run"):])})
        return type("P", (), {"returncode": 0})
    monkeypatch.setattr(sweep.subprocess, "run", run)
    sweep.main(str(path), out_dir=str(out))  # no SystemExit: nothing failed
    captured = capsys.readouterr()
    assert "already exists" in captured.err  # the run's own refusal, as it happened
    assert len(calls) == 2 and captured.out.splitlines()[-1] == \
        "sweep: 2 points: 1 trained here, 1 finished by another runner", captured.out
    assert json.loads((first / "summary.json").read_text()) == {"status": "finished"}  # left as it was


def test_a_run_that_fails_before_its_first_checkpoint_keeps_its_folder(tmp_path, monkeypatch, capsys):
    """The look after a failed run only reads the folder: the config.json and log of a run that
    failed before its first checkpoint stay for the user to read."""
    path, out = write_grid(tmp_path), tmp_path / "runs"
    (command, first, _), _ = sweep.plan(path, out)

    def run(cmd):
        if first.name in " ".join(cmd) or "--method=refill" in cmd:
            (first / "checkpoints").mkdir(parents=True, exist_ok=True)
            (first / "config.json").write_text(json.dumps(sweep.parse_run_flags(sweep._run_flags(cmd)).to_dict()))
            return type("P", (), {"returncode": 1})
        return type("P", (), {"returncode": 0})
    monkeypatch.setattr(sweep.subprocess, "run", run)
    with pytest.raises(SystemExit):
        sweep.main(str(path), out_dir=str(out))
    assert "1 failed" in capsys.readouterr().err and (first / "config.json").is_file()


def test_a_point_whose_holder_died_is_resumed_at_the_end(tmp_path, monkeypatch, capsys):
    path, out = write_grid(tmp_path), tmp_path / "runs"
    ran = fake_runs(monkeypatch, codes={1: RunLocked.EXIT_CODE})  # held at first, free when looked at again
    sweep.main(str(path), out_dir=str(out))
    assert [c[4] for c in ran] == ["--method=refill", "--method=rsst", "--method=refill"]
    assert capsys.readouterr().out.splitlines()[-1] == "sweep: 2 points: 2 trained here"


# ---- run folders from others: data, never code ---------------------------------------------

def test_resumed_config_writes_where_the_folder_is(tmp_path):
    moved = tmp_path / "new_place"
    moved.mkdir()
    saved = {**cfg(tmp_path / "old_place").to_dict(), "name": None}
    (moved / "r").mkdir()
    (moved / "r" / "config.json").write_text(json.dumps(saved))
    resumed = runfolder.resumed_config(cfg(moved, resume=True), {"resume": True, "name": "r"})
    assert resumed.out_dir == str(moved) and runfolder.run_dir(resumed) == moved / "r"


@pytest.mark.parametrize("name", ["config.json", "summary.json"])
def test_a_hand_edited_file_that_is_not_json_is_one_line(tmp_path, monkeypatch, capsys, name):
    (tmp_path / "r" / "checkpoints").mkdir(parents=True)
    (tmp_path / "r" / "config.json").write_text(json.dumps(cfg(tmp_path).to_dict()))
    (tmp_path / "r" / name).write_text('{"status": "running",')  # an edit cut short
    code = run_cli(monkeypatch, "run", "--resume", f"--out_dir={tmp_path}", "--name=r")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"{tmp_path / 'r' / name}: not readable as JSON" in err, err


def test_a_sweep_with_a_hand_broken_config_json_is_one_line(tmp_path):
    path, out = write_grid(tmp_path), tmp_path / "runs"
    _, run_dir, _ = sweep.plan(path, out)[0]
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text("{")
    with pytest.raises(ConfigError, match="not readable as JSON") as e:
        sweep.main(str(path), out_dir=str(out))
    assert "\n" not in str(e.value)


# ---- real processes -----------------------------------------------------------------------

def write_images(root):
    return class_folders(root, classes=("cat", "dog"))


def folder_grid(images, data_dir, methods=("refill", "rsst"), seeds=(0,)):
    return f"""
method: grid
parameters:
  method: {{values: [{', '.join(methods)}]}}
  seed: {{values: [{', '.join(map(str, seeds))}]}}
  dataset: {{value: "folder:{images}"}}
  data_dir: {{value: "{data_dir}"}}
  model: {{value: vit_micro}}
  img_size: {{value: 16}}
  batch_size: {{value: 4}}
  val_size: {{value: 4}}
  states: {{value: 2}}
  epochs: {{value: 2}}
  optimizer: {{value: adamw}}
  lr: {{value: 0.001}}
  wandb: {{value: disabled}}
command: ["${{interpreter}}", -m, vitprune, run, "${{args}}"]
"""


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}  # one thread: parallel = serial numbers


def epochs_of(run_dir):
    return [(r["state"], r["epoch"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "epoch"]


@pytest.mark.slow
def test_a_second_runner_started_after_the_first_checkpoint_trains_nothing_twice(tmp_path):
    """Runner A's run of point 1 pauses right after its first epoch (last.pt written); runner B
    then sweeps the grid: it trains point 2, leaves point 1 to A, and says so. A finishes point 1:
    every epoch recorded once, one process wrote it."""
    images, out = write_images(tmp_path / "images"), tmp_path / "runs"
    path = tmp_path / "grid.yaml"
    path.write_text(folder_grid(images, tmp_path / "data"))
    (command, first, _), (_, second, _) = sweep.plan(path, out)
    go = tmp_path / "go"
    a = subprocess.Popen([sys.executable, str(RUNNER), "run", *command[4:]], env={**ENV, "FAULT_PAUSE": f"1:{go}"},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not Path(f"{go}.paused").exists():
        assert a.poll() is None and time.time() < deadline, a.stdout.read() if a.poll() is not None else "timeout"
        time.sleep(0.1)
    b = subprocess.run([sys.executable, "-m", "vitprune", "sweep", str(path), f"--out_dir={out}"], env=ENV,
                       capture_output=True, text=True, timeout=600)
    go.touch()
    a_out, _ = a.communicate(timeout=600)
    assert a.returncode == 0, a_out
    assert b.returncode == 0, b.stdout + b.stderr
    lines = b.stdout.splitlines()
    assert lines[-1] == "sweep: 2 points: 1 trained here, 1 running elsewhere", lines
    assert f"[1/2] {first}: running elsewhere" in b.stdout and f"[2/2] {second} (new)" in b.stdout
    for run_dir in (first, second):
        assert epochs_of(run_dir) == [(0, 0), (0, 1), (1, 0), (1, 1)]
        assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"
    assert a_out.count("state 0 epoch 1 |") == 1 and "resuming" not in a_out


def comparable(run_dir):
    return [{k: v for k, v in json.loads(line).items() if not k.endswith("time_s")}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def last_line_counts(text):
    """{outcome: count} of a runner's last line: 'sweep: 6 points: 2 trained here, 4 ...'."""
    line = text.strip().splitlines()[-1]
    assert line.startswith("sweep: 6 points: "), line
    return {part.split(" ", 1)[1]: int(part.split(" ", 1)[0]) for part in line[len("sweep: 6 points: "):].split(", ")}


@pytest.mark.slow
def test_soak_sweep_runners_sharing_an_out_dir_train_every_point_once(tmp_path):
    """Three runners start together on one --out_dir over a 6-point grid on an image folder none
    has decoded, a fourth joins once the first point has finished. Every point finishes, each
    is started once, each run's records equal a serial run's, and every runner's last line adds
    up to the truth."""
    images = write_images(tmp_path / "images")
    path = tmp_path / "grid.yaml"
    path.write_text(folder_grid(images, tmp_path / "data", seeds=(0, 1, 2)))
    out = tmp_path / "runs"
    sweep_cmd = [sys.executable, "-m", "vitprune", "sweep", str(path), f"--out_dir={out}"]
    start = lambda: subprocess.Popen(sweep_cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    runners = [start() for _ in range(3)]
    points = [run_dir for _, run_dir, _ in sweep.plan(path, out)]
    deadline = time.time() + 900
    while not any((d / "summary.json").is_file() and json.loads((d / "summary.json").read_text())["status"] ==
                  "finished" for d in points):
        assert time.time() < deadline and all(r.poll() is None for r in runners)
        time.sleep(0.2)
    runners.append(start())  # mid-way
    outputs = [r.communicate(timeout=900)[0] for r in runners]
    assert all(r.returncode == 0 for r in runners), [(r.returncode, o[-3000:]) for r, o in zip(runners, outputs)
                                                     if r.returncode]
    counts = [last_line_counts(text) for text in outputs]
    assert sum(c.get("trained here", 0) for c in counts) == 6, [o.splitlines()[-1] for o in outputs]
    assert all(sum(c.values()) == 6 and "failed" not in c for c in counts)
    assert counts[3].get("trained here", 0) <= 6 - sum(c.get("trained here", 0) for c in counts[:3])
    everything = "".join(outputs)
    assert "resuming" not in everything and "Traceback" not in everything
    for d in points:
        starts = [line for line in everything.splitlines() if line.startswith(f"{d.name}: ")]
        assert len(starts) == 1, (d.name, starts)  # the run's start-up line, once: trained once
        assert json.loads((d / "summary.json").read_text())["status"] == "finished"
    assert len(list((tmp_path / "data" / "decoded").glob("*.pt"))) == 1  # the images decoded once
    serial = tmp_path / "serial"
    done = subprocess.run([*sweep_cmd[:-1], f"--out_dir={serial}"], env=ENV, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    for d in points:
        assert comparable(d) == comparable(serial / d.name), d.name
