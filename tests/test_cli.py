"""The command line fails fast and explains itself: each case as a user types it (a subprocess),
with its exit code, its one-line message, what it leaves on disk and how long it takes."""
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vitprune.__main__ import default_text, help_text
from vitprune.config import FIELDS

REPO = Path(__file__).parent.parent


def vitprune(*args, cwd):
    """`python -m vitprune ARGS` started in `cwd` (this checkout's vitprune, wherever cwd is)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "vitprune", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                       env=env, timeout=120)
    return r, time.perf_counter() - t0


@pytest.mark.parametrize("args, message", [
    (["--method=refill", "refill", "--states=1"], "error: 'refill': stray argument; every setting is a flag"),
    (["--ratoi=0.5"], "error: --ratoi: unknown flag; did you mean --ratio?"),
    (["--method=prune"], "error: --method: unknown value 'prune'; choose from refill, rsst, imp, dense"),
    (["--out_dir=afile"], "error: --out_dir: 'afile' is a file, not a folder"),
    (["--out_dir=afile/runs"], "error: --out_dir: 'afile/runs' lies under the file"),
    (["--data_dir=afile"], "error: --data_dir: 'afile' is a file, not a folder"),
])
def test_bad_command_fails_fast_in_one_line_and_creates_nothing(tmp_path, args, message):
    (tmp_path / "afile").write_text("not a folder")
    r, seconds = vitprune("run", "--dataset=synthetic", *args, cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(message), r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # no runs/, no data/
    assert seconds < 3, f"{seconds:.1f} s: the flags must be checked before torch is imported"


def test_help_lists_every_flag_with_its_default(tmp_path):
    for flag in ("--help", "-h"):
        r, _ = vitprune("run", flag, cwd=tmp_path)
        assert r.returncode == 0 and r.stdout.strip() == help_text()
    for group in ("experiment:", "pruning:", "RSST:", "optimisation:", "system:", "logging:"):
        assert f"\n{group}\n" in r.stdout
    for name, f in FIELDS.items():
        assert re.search(rf"^  --{name}={re.escape(default_text(f.default))} ", r.stdout, re.M), name
    assert not list(tmp_path.iterdir())


def test_resume_of_a_finished_run_says_so_and_touches_nothing(tmp_path):
    run_dir = tmp_path / "runs" / "done"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"checkpoint")
    (run_dir / "config.json").write_text(json.dumps({"states": 3}))
    (run_dir / "summary.json").write_text(json.dumps({"status": "finished", "states_done": 3}))
    before = {p: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
              for p in run_dir.rglob("*") if p.is_file()}
    r, seconds = vitprune("run", "--resume", "--out_dir=runs", "--name=done", cwd=tmp_path)
    assert r.returncode == 0 and r.stderr == ""
    assert "finished all its 3 states already: nothing to resume" in r.stdout
    assert before == {p: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
                      for p in run_dir.rglob("*") if p.is_file()}
    assert seconds < 3


def test_failed_download_leaves_no_data_folder(tmp_path, monkeypatch, capsys):
    """torchvision creates the data folder (and a partial archive) before the download
    fails: all of it is removed again."""
    import torchvision
    from vitprune.__main__ import main

    def failing_download(self):
        Path(self.root).mkdir(parents=True, exist_ok=True)
        (Path(self.root) / "cifar-100-python.tar.gz").write_bytes(b"partial")
        raise OSError("no network")
    monkeypatch.setattr(torchvision.datasets.CIFAR100, "download", failing_download)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["vitprune", "run", "--dataset=cifar100", "--data_dir=data/cifar",
                                      "--wandb=disabled"])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--data_dir" in err and "--dataset=synthetic" in err
    assert not list(tmp_path.iterdir())  # neither data/ nor runs/
    (tmp_path / "data").mkdir()  # a data folder that existed keeps what it had, loses the partial file
    (tmp_path / "data" / "mine.txt").write_text("keep")
    monkeypatch.setattr(sys, "argv", ["vitprune", "run", "--dataset=cifar100", "--data_dir=data", "--wandb=disabled"])
    with pytest.raises(SystemExit):
        main()
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["mine.txt"]
