"""DDP on CPU (gloo, 2 processes): same global batch, same results, only rank 0 writes."""
import json
import os
import subprocess
import sys

import pytest

FLAGS = ["--method=refill", "--dataset=synthetic", "--model=vit_micro", "--optimizer=adamw", "--lr=1e-3",
         "--states=2", "--epochs=1", "--wandb=disabled"]


def rows(run_dir):
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_torchrun_two_processes_match_one(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes on two cores
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "vitprune", "run", *FLAGS, f"--out_dir={tmp_path}", "--name=ddp"],
                         capture_output=True, text=True, env=env)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    assert ddp.stdout.count("done in") == 1  # only rank 0 prints
    single = subprocess.run([sys.executable, "-m", "vitprune", "run", *FLAGS, f"--out_dir={tmp_path}",
                             "--name=single"], capture_output=True, text=True, env=env)
    assert single.returncode == 0, single.stderr[-2000:]
    a, b = rows(tmp_path / "ddp"), rows(tmp_path / "single")
    assert [r["kind"] for r in a] == ["epoch", "state", "epoch", "state"]  # one writer, no duplicates
    for x, y in zip(a, b):
        assert x["state"] == y["state"]
        if x["kind"] == "epoch":
            assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-4)
            assert x["val_acc"] == pytest.approx(y["val_acc"], abs=0.5)
        else:
            assert x["final_test_acc"] == pytest.approx(y["final_test_acc"], abs=0.5)
            assert x["params_alive"] == y["params_alive"]
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == sorted(p.name for p in (tmp_path / "single").iterdir())
