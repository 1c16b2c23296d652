"""DDP on CPU (gloo, 2 processes): same global batch, same results as one process, only
rank 0 writes, and a run killed in the middle of an RSST state resumes under torchrun."""
import json
import os
import subprocess
import sys

import pytest

from conftest import kill_mid_state

FLAGS = ["--method=rsst", "--dataset=synthetic", "--model=vit_micro", "--states=2", "--epochs=2", "--ratio=0.5",
         "--reg_formula=seed", "--reg_granularity_prune=20", "--reg_schedule=x", "--wandb=disabled"]
pytestmark = pytest.mark.slow

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes on two cores


def rows(run_dir):
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_torchrun_two_processes_match_one_and_resume(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "vitprune", "run", *FLAGS, f"--out_dir={tmp_path}", "--name=ddp"]
    kill_mid_state(torchrun, tmp_path / "ddp", state=1, next_epoch=1, env=ENV)
    ddp = subprocess.run(torchrun + ["--resume"], capture_output=True, text=True, env=ENV)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    assert "at state 1, epoch 1" in ddp.stdout and "2 processes" in ddp.stdout
    assert ddp.stdout.count("done in") == 1  # only rank 0 prints
    single = subprocess.run([sys.executable, "-m", "vitprune", "run", *FLAGS, f"--out_dir={tmp_path}",
                             "--name=single"], capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-2000:]
    a, b = rows(tmp_path / "ddp"), rows(tmp_path / "single")
    assert [r["kind"] for r in a] == ["epoch", "epoch", "state"] * 2  # one writer, no duplicates
    for x, y in zip(a, b):
        assert (x["state"], x.get("epoch")) == (y["state"], y.get("epoch"))
        if x["kind"] == "epoch":
            assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-4)
            assert x["val_acc"] == pytest.approx(y["val_acc"], abs=0.5)
            assert x["reg_lambda"] == pytest.approx(y["reg_lambda"])
        else:
            assert x["final_test_acc"] == pytest.approx(y["final_test_acc"], abs=0.5)
            assert x["params_alive"] == y["params_alive"]
    files = lambda d: sorted(p.relative_to(d) for p in d.rglob("*"))
    assert files(tmp_path / "ddp") == files(tmp_path / "single")
