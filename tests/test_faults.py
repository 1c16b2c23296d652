"""Faults of long jobs: damaged checkpoints, a full disk at every kind of write, W&B failing,
signals during a state's finish, repeated kills (the soak test). Tiny in-process runs of
vit_micro on a small synthetic set; the soak test kills real processes."""
import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import types
import warnings
from pathlib import Path

import pytest
import torch

import vitprune.train as train
import vitprune.runtime as runtime
from conftest import class_folders, run_cli, small_data
from vitprune import checkpoint, files
from vitprune.data import folder as folder_module
from vitprune.data import images

pytestmark = pytest.mark.slow

SIZES = (128, 64, 64)  # train, val, test: 4 steps an epoch at batch 32
FLAGS = ["--dataset=synthetic", "--model=vit_micro", "--img_size=16", "--patch_size=4", "--batch_size=32",
         "--optimizer=adamw", "--lr=1e-3", "--states=2", "--epochs=2", "--wandb=disabled"]
RUNNER = Path(__file__).with_name("fault_runner.py")
REAL_LOAD_DATA = runtime.load_data  # image folders: the real loader
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "FAULT_SIZES": ",".join(map(str, SIZES))}


class Crash(BaseException):
    """Stands for a SIGKILL in an in-process run: nothing after it runs."""


@pytest.fixture(autouse=True)
def tiny(monkeypatch):
    monkeypatch.setattr(runtime, "load_data", small_data(SIZES))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the soak's processes (OMP_NUM_THREADS=1): the same numbers
    yield
    torch.set_num_threads(threads)


def comparable(run_dir):
    """metrics.jsonl without wall-clock times (every line must parse: nothing torn)."""
    return [{k: v for k, v in json.loads(line).items() if not k.endswith("time_s")}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def vitprune_run(monkeypatch, out, name, *more):
    return run_cli(monkeypatch, "run", *FLAGS, f"--out_dir={out}", f"--name={name}", *more)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted tiny runs: {method: run folder}, each made when first asked for."""
    out = tmp_path_factory.mktemp("reference")

    class Runs(dict):
        def __missing__(self, method):
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(runtime, "load_data", small_data(SIZES))
                assert vitprune_run(mp, out, method, f"--method={method}") == 0
            self[method] = out / method
            return self[method]
    return Runs()


def crash_in(monkeypatch, state: int, epoch: int):
    """The next run dies as it starts training (state, epoch), last.pt at its start."""
    real = train.train_epoch

    def train_epoch(r, pos, tools, e, stop):
        if (pos.state, e) == (state, epoch):
            raise Crash()
        return real(r, pos, tools, e, stop)
    monkeypatch.setattr(train, "train_epoch", train_epoch)


def crashed_run(monkeypatch, out, method="refill", state=1, epoch=1, *more):
    with monkeypatch.context() as mp:
        crash_in(mp, state, epoch)
        with pytest.raises(Crash):
            vitprune_run(mp, out, "r", f"--method={method}", *more)
    return out / "r"


# ---- damaged checkpoints ------------------------------------------------------------------

def truncate(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def flip(path):
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 8):  # inside the weights: the zip still opens
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def remove_sidecars(ckpt_dir):  # a run folder written before sidecars existed
    for p in ckpt_dir.glob("*.pt.json"):
        p.unlink()


@pytest.mark.parametrize("damage", ["truncated", "flipped", "missing", "truncated, no sidecars"])
def test_damaged_last_pt_resumes_from_the_start_of_the_state(reference, tmp_path, monkeypatch, capsys, damage):
    run_dir = crashed_run(monkeypatch, tmp_path)
    last = run_dir / "checkpoints" / "last.pt"
    assert torch.load(last, weights_only=True)["next_epoch"] == 1  # state 1, epoch 0 done
    if damage == "missing":
        last.unlink()
    elif damage == "flipped":
        flip(last)
    else:
        truncate(last)
        if "no sidecars" in damage:
            remove_sidecars(run_dir / "checkpoints")
    capsys.readouterr()
    assert vitprune_run(monkeypatch, tmp_path, "r", "--resume") == 0
    notice = [line for line in capsys.readouterr().out.splitlines() if "resuming from" in line]
    why = {"truncated": "damaged (truncated", "flipped": "damaged (checksum mismatch)", "missing": "missing",
           "truncated, no sidecars": "damaged (unreadable"}[damage]
    assert len(notice) == 1 and notice[0].startswith(f"last.pt {why}"), notice
    assert notice[0].endswith("resuming from start_01.pt, the start of state 1 (epoch 0): 1 epoch record "
                              "after it dropped from metrics.jsonl and redone")
    assert comparable(run_dir) == comparable(reference["refill"])


def test_state_end_checkpoint_when_last_and_start_are_damaged(reference, tmp_path, monkeypatch, capsys):
    run_dir = crashed_run(monkeypatch, tmp_path, method="rsst")
    flip(run_dir / "checkpoints" / "last.pt")
    truncate(run_dir / "checkpoints" / "start_01.pt")
    capsys.readouterr()
    assert vitprune_run(monkeypatch, tmp_path, "r", "--resume") == 0
    out = capsys.readouterr().out
    assert ("last.pt damaged (checksum mismatch); start_01.pt damaged (truncated or extended: "
            in out and "resuming from state_00.pt, the end of state 0: 1 epoch record" in out)
    assert comparable(run_dir) == comparable(reference["rsst"])  # state 1's transition redone exactly


def test_every_checkpoint_damaged_starts_the_run_again_with_one_line(reference, tmp_path, monkeypatch, capsys):
    """Nothing to continue from: --resume starts again from scratch (a sweep that resumes the
    folder never loops on it) and ends where an uninterrupted run ends."""
    run_dir = crashed_run(monkeypatch, tmp_path)
    ckpts = run_dir / "checkpoints"
    truncate(ckpts / "last.pt")
    flip(ckpts / "start_01.pt")
    (ckpts / "state_00.pt").unlink()
    capsys.readouterr()
    assert vitprune_run(monkeypatch, tmp_path, "r", "--resume") == 0
    said = [line for line in capsys.readouterr().out.splitlines() if "from scratch" in line]
    assert len(said) == 1 and said[0].startswith("--resume: nothing to continue from (last.pt damaged (truncated")
    assert said[0].endswith("start_01.pt damaged (checksum mismatch)); starting the run again from scratch")
    assert comparable(run_dir) == comparable(reference["refill"])


def test_a_run_that_died_in_its_first_evaluation_starts_again(reference, tmp_path, monkeypatch, capsys):
    """Only rewind.pt was written (the run died evaluating state 0's start): the folder resumes
    by starting again, once."""
    run_dir = crashed_run(monkeypatch, tmp_path, "refill", 0, 0)
    for path in run_dir.glob("checkpoints/*.pt"):
        if path.name != "rewind.pt":
            checkpoint.remove(path)
    assert [p.name for p in run_dir.glob("checkpoints/*.pt")] == ["rewind.pt"]
    assert sweep_status(run_dir) == "resume"
    capsys.readouterr()
    assert vitprune_run(monkeypatch, tmp_path, "r", "--resume") == 0
    assert "starting the run again from scratch" in capsys.readouterr().out
    assert comparable(run_dir) == comparable(reference["refill"])


def sweep_status(run_dir):
    from vitprune.sweep import _status
    return _status(run_dir)


@pytest.mark.parametrize("rebuilt", [True, False])
def test_a_damaged_rewind_point_is_rebuilt_from_the_seed(reference, tmp_path, monkeypatch, capsys, rebuilt):
    """--rewind=init: θ0 is rebuilt from the seed and accepted when its checksum is the one
    recorded; otherwise the run starts again. Either way it ends as an uninterrupted run."""
    run_dir = crashed_run(monkeypatch, tmp_path)
    rewind = run_dir / "checkpoints" / "rewind.pt"
    saved = rewind.read_bytes()
    flip(rewind)
    if not rebuilt:  # another θ0 than the seed gives now (say, another torch): never used silently
        side = json.loads(checkpoint.sidecar(rewind).read_text())
        checkpoint.sidecar(rewind).write_text(json.dumps({**side, "sha256": "0" * 64}))
    capsys.readouterr()
    assert vitprune_run(monkeypatch, tmp_path, "r", "--resume") == 0
    out = capsys.readouterr().out
    if rebuilt:
        assert "rewind.pt damaged (checksum mismatch); θ0 rebuilt from the seed" in out
        assert rewind.read_bytes() == saved
    else:
        assert "rewind.pt damaged (checksum mismatch), and the rewind point cannot be rebuilt); starting the run " \
               "again from scratch" in out
    assert comparable(run_dir) == comparable(reference["refill"])


def test_a_checkpoint_ahead_of_the_metrics_is_passed_over(reference, tmp_path, monkeypatch, capsys):
    """A power loss can keep last.pt's rename and lose the append before it: --resume says so
    and continues from the newest checkpoint the records reach."""
    run_dir = crashed_run(monkeypatch, tmp_path)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
    assert json.loads(lines[-1])["kind"] == "epoch" and json.loads(lines[-1])["state"] == 1
    (run_dir / "metrics.jsonl").write_text("".join(lines[:-1]))
    capsys.readouterr()
    assert vitprune_run(monkeypatch, tmp_path, "r", "--resume") == 0
    said = [line for line in capsys.readouterr().out.splitlines() if "resuming from" in line]
    assert said == ["last.pt is ahead of metrics.jsonl (it has 0 of the 1 epoch records of state 1 the checkpoint "
                    "saw); resuming from start_01.pt, the start of state 1 (epoch 0): 0 epoch records after it "
                    "dropped from metrics.jsonl and redone"], said
    assert comparable(run_dir) == comparable(reference["refill"])


def test_an_edited_config_json_is_named_in_one_line(tmp_path, monkeypatch, capsys):
    run_dir = crashed_run(monkeypatch, tmp_path)
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, "lr": 0.5}))
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert run_cli(monkeypatch, "run", "--resume", f"--out_dir={tmp_path}", "--name=r") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config.json was edited: --lr is 0.5 there, but the run was trained with 0.001" \
        in err, err
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_appends_are_durable_before_each_checkpoint_and_renames_are_fsynced(tmp_path, monkeypatch):
    """The order a power loss needs (it cannot be caused here, so the calls are recorded): every
    record appended to metrics.jsonl is fsynced before the next checkpoint replaces its
    predecessor, and every rename is followed by an fsync of its folder."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        real_replace(src, dst)
    with monkeypatch.context() as mp:
        mp.setattr(files.os, "fsync", fsync)
        mp.setattr(files.os, "replace", replace)
        mp.setattr(train.log, "append_line", lambda path, line: (events.append(("append", str(path))),
                                                                 files.append_line(path, line))[1])
        assert vitprune_run(mp, tmp_path, "r", "--method=refill") == 0
    run_dir = str(tmp_path / "r")
    appended = [i for i, e in enumerate(events) if e == ("append", f"{run_dir}/metrics.jsonl")]
    assert len(appended) == 6  # 4 epochs, 2 states
    for i in appended:  # its fsync comes before any later rename
        fsynced = next(j for j in range(i, len(events)) if events[j] == ("fsync", f"{run_dir}/metrics.jsonl"))
        renamed = next((j for j in range(i, len(events)) if events[j][0] == "replace"), len(events))
        assert fsynced < renamed
    for i, (kind, dst) in enumerate(events):
        if kind == "replace":
            assert events[i + 1] == ("fsync", str(Path(dst).parent)), events[i:i + 2]


class WritesAFile:
    """Unpickling it runs code: it would create the file `path`."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.mark.parametrize("sidecar", ["matching sidecar", "no sidecar"])
def test_a_checkpoint_that_needs_pickle_is_refused_not_run(tmp_path, monkeypatch, capsys, sidecar):
    """A received run folder is data: a checkpoint holding a Python object that unpickling would
    run is refused with a line naming pickle (not treated as damaged, no fall-back), its code never
    runs, and nothing in the folder changes."""
    run_dir = crashed_run(monkeypatch, tmp_path)
    last, pwned = run_dir / "checkpoints" / "last.pt", tmp_path / "pwned"
    ck = torch.load(last, weights_only=True)
    checkpoint.save({**ck, "history": [WritesAFile(pwned)]}, last)  # checksum and all: it verifies
    if sidecar == "no sidecar":
        checkpoint.sidecar(last).unlink()
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert run_cli(monkeypatch, "run", "--resume", f"--out_dir={tmp_path}", "--name=r") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: {last} holds Python objects that only pickle can load" in err, err
    assert "GLOBAL" in err and "without pickle" in err
    assert not pwned.exists()
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_nothing_loads_with_pickle():
    """Every torch.load in the package and in this suite passes weights_only=True, so the suite's
    runs prove that no checkpoint, cache or export vitprune writes needs pickle to load."""
    import re
    root = Path(__file__).parent.parent
    loads = {}
    for path in [*root.glob("vitprune/**/*.py"), *root.glob("kernels/*.py"), *root.glob("tests/*.py")]:
        text = path.read_text()
        for m in re.finditer(r"torch\.load\((.*)", text):
            loads[f"{path.relative_to(root)}:{text[:m.start()].count(chr(10)) + 1}"] = m.group(1)
    assert len(loads) > 10
    unsafe = {where: call for where, call in loads.items()
              if "weights_only=True" not in call}
    assert not unsafe, unsafe


def test_a_moved_run_folder_resumes_where_it_is(reference, tmp_path, monkeypatch):
    """--resume continues the folder --out_dir/--name finds (here the default --out_dir=runs),
    whatever out_dir its config.json saved: a copy taken elsewhere is written there, and the
    original is left as it was."""
    import shutil
    run_dir = crashed_run(monkeypatch, tmp_path / "here")
    shutil.copytree(run_dir, tmp_path / "there" / "runs" / "r")
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    monkeypatch.chdir(tmp_path / "there")
    assert run_cli(monkeypatch, "run", "--resume", "--name=r") == 0
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    moved = tmp_path / "there" / "runs" / "r"
    assert comparable(moved) == comparable(reference["refill"])
    assert json.loads((moved / "summary.json").read_text())["config"]["out_dir"] == "runs"


def test_a_checkpoint_is_verified_before_it_replaces_the_previous_one(tmp_path, monkeypatch):
    """A write whose bytes do not read back leaves the previous file and its sidecar."""
    path = tmp_path / "last.pt"
    checkpoint.save({"a": torch.arange(4)}, path)
    real_write = files.Writer.write
    monkeypatch.setattr(files.Writer, "write", lambda self, data: (real_write(self, data), self.f.write(b"x"))[0])
    with pytest.raises(OSError, match="read back differ"):
        checkpoint.save({"a": torch.arange(5)}, path)
    assert torch.equal(checkpoint.load(path)["a"], torch.arange(4)) and not list(tmp_path.glob("*.tmp"))


def test_a_crash_between_sidecar_and_rename_leaves_a_file_that_verifies(tmp_path, monkeypatch):
    """The sidecar is written before the rename: it accepts the previous file as well."""
    path = tmp_path / "last.pt"
    checkpoint.save({"a": torch.arange(4)}, path)
    with monkeypatch.context() as mp:
        real_replace = os.replace

        def replace(src, dst):
            if Path(dst).name == "last.pt":  # the sidecar is renamed; the checkpoint is not
                raise Crash()
            real_replace(src, dst)
        mp.setattr(files.os, "replace", replace)
        with pytest.raises(Crash):
            checkpoint.save({"a": torch.arange(5)}, path)
    assert torch.equal(checkpoint.load(path)["a"], torch.arange(4))  # the old file, the new sidecar
    checkpoint.save({"a": torch.arange(6)}, path)
    assert torch.equal(checkpoint.load(path)["a"], torch.arange(6))


# ---- a full disk --------------------------------------------------------------------------

def disk_fills(monkeypatch, name: str, nth: int):
    """The nth file named `name` written (its temp file, or an append) hits ENOSPC half-way
    through its first chunk."""
    real_write = files.Writer.write
    seen = []

    def write(self, data):
        written = Path(self.f.name).name  # the file itself (an append), or its temp file NAME.PID.RANDOM.tmp
        if re.fullmatch(re.escape(name) + r"(\.\d+\.[0-9a-f]+\.tmp)?", written) and self.size == 0:  # not NAME.json
            if id(self) not in seen:
                seen.append(id(self))
            if len(seen) == nth and seen[-1] == id(self):
                view = memoryview(data).cast("B")
                self.f.write(view[:view.nbytes // 2])
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)
    monkeypatch.setattr(files.Writer, "write", write)


def check_intact(run_dir, reference_dir):
    """Every checkpoint verifies, nothing torn or half-written is left, and metrics.jsonl is a
    prefix of the uninterrupted run's."""
    for p in (run_dir / "checkpoints").glob("*.pt"):
        checkpoint.load(p)
    assert not list(run_dir.rglob("*.tmp"))
    json.loads((run_dir / "summary.json").read_text())
    got = comparable(run_dir)
    assert got == comparable(reference_dir)[:len(got)]


@pytest.mark.parametrize("name, nth", [("last.pt", 4), ("start_01.pt", 1), ("state_00.pt", 1),
                                       ("metrics.jsonl", 3), ("summary.json", 2)])
def test_full_disk_during_a_run_stops_with_one_line_and_resumes(reference, tmp_path, monkeypatch, capsys,
                                                                name, nth):
    with monkeypatch.context() as mp:
        disk_fills(mp, name, nth)
        code = vitprune_run(mp, tmp_path, "r", "--method=refill")
    err = capsys.readouterr().err
    path = tmp_path / "r" / ("checkpoints/" + name if name.endswith(".pt") else name)
    assert code == 75 and err.count("\n") == 1, err
    assert err.startswith(f"error: disk full: writing {path} needs ") and "run the command again" in err
    assert int(err.split(" needs ")[1].split(" bytes")[0].replace(",", "")) > 0
    check_intact(tmp_path / "r", reference["refill"])
    assert vitprune_run(monkeypatch, tmp_path, "r", "--resume") == 0
    assert comparable(tmp_path / "r") == comparable(reference["refill"])


def test_full_disk_during_an_export_keeps_the_earlier_export(reference, tmp_path, monkeypatch, capsys):
    ck = reference["refill"] / "checkpoints" / "state_01.pt"
    out = tmp_path / "export"
    assert run_cli(monkeypatch, "export", ck, out) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    with monkeypatch.context() as mp:
        disk_fills(mp, "model.safetensors", 1)
        assert run_cli(mp, "export", reference["refill"] / "checkpoints" / "state_00.pt", out) == 75
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: disk full: writing {out / 'model.safetensors'} needs ")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def write_tree(root):
    return class_folders(root, per_class=12)


def test_full_disk_during_the_decode_cache_leaves_no_cache(tmp_path, monkeypatch, capsys):
    layout = folder_module.scan(str(write_tree(tmp_path / "tree")))
    cache = folder_module.cache_file(layout, 16, str(tmp_path / "data"))
    with monkeypatch.context() as mp:
        disk_fills(mp, cache.name, 1)
        with pytest.raises(files.DiskFull, match=f"writing {cache} needs "):
            folder_module.decoded(layout, 16, str(tmp_path / "data"))
    assert not (tmp_path / "data").exists()  # neither the cache nor the folders made for it
    fresh = folder_module.decoded(layout, 16, str(tmp_path / "data"))  # space freed: decodes and caches
    assert torch.equal(torch.load(cache, weights_only=True)["all"], fresh["all"])


# ---- W&B failing --------------------------------------------------------------------------

class FakeWandb(types.ModuleType):
    """Stands for the wandb package: runs keep their rows by id (the server), and `fail`
    ('init', 'log', 'finish') raises there."""

    def __init__(self, fail=None):
        super().__init__("wandb")
        self.fail, self.server, self.init_ids = fail, {}, []

    def init(self, mode, id=None, resume=None, **kwargs):
        self.init_ids.append(id)
        if self.fail == "init":
            raise ConnectionError("W&B is down")
        return FakeRun(self, id or f"run{len(self.server)}")


class FakeRun:
    def __init__(self, wandb, run_id):
        self.wandb, self.id, self.summary = wandb, run_id, {}
        self.rows = wandb.server.setdefault(run_id, [])
        self.step = len(self.rows)  # a resumed run continues after the steps it has
        self.settings = types.SimpleNamespace(sync_dir="nowhere")

    def define_metric(self, *args, **kwargs):
        pass

    def log(self, row):
        if self.wandb.fail == "log" and len(self.rows) == 3:
            raise ConnectionError("W&B is down")
        self.rows.append(row)

    def finish(self, exit_code=0):
        if self.wandb.fail == "finish":
            raise ConnectionError("W&B is down")


@pytest.mark.parametrize("fail", ["init", "log", "finish"])
def test_wandb_failing_never_stops_training(reference, tmp_path, monkeypatch, fail):
    wandb = FakeWandb(fail)
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert vitprune_run(monkeypatch, tmp_path, "r", "--method=refill", "--wandb=online") == 0
    mirrored = [w for w in caught if "W&B" in str(w.message)]
    assert len(mirrored) == 1 and str(mirrored[0].message).startswith(f"W&B stopped mirroring: {fail} failed")
    assert comparable(tmp_path / "r") == comparable(reference["refill"])
    rows = sum(wandb.server.values(), [])
    assert len(rows) == {"init": 0, "log": 3, "finish": len(comparable(tmp_path / "r"))}[fail]


def test_resumed_online_run_logs_each_epoch_once(reference, tmp_path, monkeypatch):
    wandb = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    run_dir = crashed_run(monkeypatch, tmp_path, "refill", 1, 1, "--wandb=online")
    (run_dir / "checkpoints" / "last.pt").unlink()  # state 1's epoch 0 is redone: W&B has it already
    assert vitprune_run(monkeypatch, tmp_path, "r", "--resume", "--wandb=online") == 0
    run_id = json.loads((run_dir / "wandb_id.txt").read_text())["id"]
    assert wandb.init_ids == [None, run_id] and list(wandb.server) == [run_id]  # the same W&B run
    epochs = [(row["global_epoch"]) for row in wandb.server[run_id] if "global_epoch" in row]
    assert sorted(epochs) == list(range(4))  # each epoch once
    assert len(wandb.server[run_id]) == len(comparable(run_dir)) == len(comparable(reference["refill"]))


# ---- signals during a state's finish --------------------------------------------------------

def signal_in_finish(monkeypatch, state: int):
    real = train.finish_state

    def finish_state(r, pos, tools):
        if pos.state == state:
            os.kill(os.getpid(), signal.SIGINT)
        real(r, pos, tools)
    monkeypatch.setattr(train, "finish_state", finish_state)


def test_signal_during_a_finish_stops_before_the_next_state_trains(reference, tmp_path, monkeypatch, capsys):
    with monkeypatch.context() as mp:
        signal_in_finish(mp, 0)
        assert vitprune_run(mp, tmp_path, "r", "--method=refill") == 130
    assert "interrupted at state 1, epoch 0, step 0" in capsys.readouterr().out
    ck = checkpoint.load(tmp_path / "r" / "checkpoints" / "last.pt")
    assert (ck["state"], ck["next_epoch"], ck["step"]) == (1, 0, 0)
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["status"] == "interrupted"
    assert vitprune_run(monkeypatch, tmp_path, "r", "--resume") == 0
    assert comparable(tmp_path / "r") == comparable(reference["refill"])


def test_signal_during_the_last_finish_is_honoured(tmp_path, monkeypatch, capsys):
    with monkeypatch.context() as mp:
        signal_in_finish(mp, 1)
        assert vitprune_run(mp, tmp_path, "r", "--method=refill") == 130
    assert "SIGINT after the last step: the run had finished" in capsys.readouterr().out
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["status"] == "finished"


# ---- an undecodable image in a streamed folder ----------------------------------------------

def test_streamed_folder_with_an_undecodable_image_fails_before_training(tmp_path, monkeypatch, capsys):
    root = write_tree(tmp_path / "tree")
    bad = root / "dog" / "img_007.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # a PNG signature, then nothing readable
    monkeypatch.setattr(runtime, "load_data", REAL_LOAD_DATA)
    monkeypatch.setattr(images, "decode", lambda *a: pytest.fail("decoded: the check must read headers only"))
    code = run_cli(monkeypatch, "run", f"--dataset=folder:{root}", *FLAGS[1:], "--data_loader=stream",
                   "--batch_size=8", f"--data_dir={tmp_path / 'data'}", f"--out_dir={tmp_path / 'runs'}")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: --dataset: cannot decode {bad} ("), err
    assert not (tmp_path / "runs").exists()


# ---- the soak test: one run killed again and again ------------------------------------------

def soak(out: Path, args: list, env: dict, rng: random.Random, writes: int, kills: int = 3) -> int:
    """Run `args`, SIGKILL it `kills` times (at a random step boundary, or in the middle of a
    random write), resuming each time; returns the kills that landed."""
    landed, resume = 0, []
    for i in range(kills):
        fault = f"step:{rng.randint(1, 6)}" if i % 2 == 0 else f"write:{rng.randint(1, writes)}"
        p = subprocess.run([sys.executable, str(RUNNER), "run", *args, *resume],
                           env={**env, "FAULT_KILL": fault}, capture_output=True, text=True)
        if p.returncode == 0:  # the fault lay beyond the end of the run
            break
        assert p.returncode == -signal.SIGKILL, f"{fault}: {p.stderr[-2000:]}"
        landed, resume = landed + 1, ["--resume"]
    return landed


def count_writes(monkeypatch, *args) -> int:
    """Chunks written by an uninterrupted run of `args` (where a mid-write kill can land)."""
    real_write, n = files.Writer.write, [0]

    def write(self, data):
        n[0] += 1
        return real_write(self, data)
    with monkeypatch.context() as mp:
        mp.setattr(files.Writer, "write", write)
        assert run_cli(mp, "run", *args) == 0
    return n[0]


def test_soak_repeated_kills_equal_an_uninterrupted_run(tmp_path, monkeypatch, capsys):
    seed = int(os.environ.get("VITPRUNE_SOAK_SEED", "2026"))
    rng, t0, kills = random.Random(seed), time.time(), 0
    tree = write_tree(tmp_path / "tree")
    configs = {"refill": (FLAGS, ["--method=refill"], ENV),
               "rsst": (FLAGS, ["--method=rsst"], ENV),
               "stream": ([f"--dataset=folder:{tree}", *FLAGS[1:], "--batch_size=8", "--data_loader=stream",
                           f"--data_dir={tmp_path / 'data'}"], ["--method=refill"], {**ENV, "FAULT_SIZES": ""})}
    for name, (flags, method, env) in configs.items():
        if name == "stream":
            monkeypatch.setattr(runtime, "load_data", REAL_LOAD_DATA)
        ref = [*flags, *method, f"--out_dir={tmp_path / 'ref'}", f"--name={name}"]
        writes = count_writes(monkeypatch, *ref)
        kills += soak(tmp_path, [*flags, *method, f"--out_dir={tmp_path}", f"--name={name}"], env, rng, writes // 2)
        assert run_cli(monkeypatch, "run", *flags, f"--out_dir={tmp_path}", f"--name={name}", "--resume") == 0
        assert comparable(tmp_path / name) == comparable(tmp_path / "ref" / name), f"{name}, seed {seed}"
    with capsys.disabled():
        print(f"\nsoak: {kills} SIGKILLs (step boundaries and mid-write), seed {seed}, {time.time() - t0:.0f}s")
    assert kills >= 6
