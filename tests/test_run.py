"""The state loop end to end on the synthetic set: the demo, the run folder, exact resume."""
import json
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import kill_mid_state
from vitprune.model import build_model
from vitprune.structure import Structure, count, dims

pytestmark = pytest.mark.slow

DEMO = ["--method=refill", "--dataset=synthetic", "--model=vit_micro", "--optimizer=adamw", "--lr=1e-3",
        "--states=3", "--epochs=2", "--wandb=disabled"]


def vitprune(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "vitprune", *args], capture_output=True, text=True, **kwargs)


def records(run_dir, kind):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def comparable(run_dir):
    """Every metric except wall-clock times."""
    return [{k: v for k, v in r.items() if not k.endswith("time_s")}
            for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    r = vitprune("run", *DEMO, f"--out_dir={out}", "--name=demo")
    assert r.returncode == 0, r.stderr
    return out / "demo", r.stdout


def test_demo_run_folder(demo):
    run_dir, stdout = demo
    assert "results in" in stdout and str(run_dir) in stdout
    assert sorted(p.name for p in run_dir.iterdir()) >= ["checkpoints", "config.json", "metrics.jsonl", "summary.json"]
    epochs, states = records(run_dir, "epoch"), records(run_dir, "state")
    assert len(epochs) == 6 and len(states) == 3
    for r in epochs:
        assert {"state", "epoch", "train_loss", "train_acc", "val_acc", "test_acc", "lr", "reg_lambda", "time_s"} <= r.keys()
    for r in states:
        assert {"state", "final_val_acc", "final_test_acc", "best_val_acc", "best_test_acc", "params_alive",
                "params_total", "heads_alive", "neurons_alive", "flops_alive", "time_s"} <= r.keys()
    assert states[0]["final_test_acc"] >= 30.0  # 3x chance on 10 classes
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["states_done"] == 3
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    pts = ["last.pt", "rewind.pt", "start_02.pt", "state_00.pt", "state_01.pt", "state_02.pt"]
    assert ckpts == sorted(pts + [p + ".json" for p in pts])  # each with its checksum; the last state's start


def test_pruned_states_count_and_zeros(demo):
    run_dir, _ = demo
    model = build_model("vit_micro", 10)
    L, H, hd, D, M = dims(model)
    states = records(run_dir, "state")
    for s in (1, 2):
        ck = torch.load(run_dir / "checkpoints" / f"state_{s:02d}.pt", weights_only=True)
        st = Structure.from_state_dict(ck["structure"])
        # ratio 0.7: round(0.3 · 16) heads and round(0.3 · 512) neurons are kept
        assert int(st.heads.sum()) == 5 and int(st.neurons.sum()) == 154
        head_params, neuron_params = 3 * hd * D + 3 * hd + hd * D, 2 * D + 1
        fixed = count(model, Structure.full(model))["params_total"] - L * (H * head_params + M * neuron_params)
        assert states[s]["params_alive"] == fixed + 5 * head_params + 154 * neuron_params
        sd = ck["model"]
        for l in range(L):
            dead_h, dead_n = ~st.heads[l], ~st.neurons[l]
            assert sd[f"blocks.{l}.attn.qkv.weight"].view(3, H, hd, D)[:, dead_h].abs().sum() == 0
            assert sd[f"blocks.{l}.attn.qkv.bias"].view(3, H, hd)[:, dead_h].abs().sum() == 0
            assert sd[f"blocks.{l}.attn.proj.weight"].view(D, H, hd)[:, dead_h].abs().sum() == 0
            assert sd[f"blocks.{l}.mlp.fc1.weight"][dead_n].abs().sum() == 0
            assert sd[f"blocks.{l}.mlp.fc2.weight"][:, dead_n].abs().sum() == 0
        alive = sum(int((v != 0).sum()) for v in sd.values())
        assert alive <= states[s]["params_alive"]


def test_sigkill_mid_state_then_resume_equals_uninterrupted(demo, tmp_path):
    run_dir, _ = demo
    args = ["run", *DEMO, f"--out_dir={tmp_path}", "--name=killed"]
    # Kill the process without warning in the middle of state 1 (during its second epoch).
    kill_mid_state([sys.executable, "-m", "vitprune", *args], tmp_path / "killed", state=1, next_epoch=1)
    assert len(records(tmp_path / "killed", "state")) == 1  # killed inside state 1
    r = vitprune(*args, "--resume")
    assert r.returncode == 0, r.stderr
    assert "at state 1, epoch 1" in r.stdout  # resumed inside the state
    assert comparable(tmp_path / "killed") == comparable(run_dir)


def test_console_counts_like_the_files(demo):
    """One convention: every epoch record (state, epoch) is a console line 'state S epoch E |'."""
    run_dir, stdout = demo
    lines = [line for line in stdout.splitlines() if " | loss " in line]
    assert [line.split(" |")[0] for line in lines] == [
        f"state {r['state']} epoch {r['epoch']}" for r in records(run_dir, "epoch")]
    assert ", 6/6 epochs, ETA" in lines[-1]


def wait_for(predicate, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline and not predicate():
        time.sleep(0.05)
    assert predicate()


def test_sigint_mid_epoch_then_the_printed_resume_command_equals_uninterrupted(demo, tmp_path):
    run_dir = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "-m", "vitprune", "run", *DEMO, f"--out_dir={tmp_path}",
                             "--name=stopped"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (run_dir / "summary.json").exists())  # written by rename: never torn
    summary = json.loads((run_dir / "summary.json").read_text())  # there before the first step
    assert (summary["status"], summary["states_done"]) == ("running", 0)
    last = run_dir / "checkpoints" / "last.pt"

    def in_state_1_epoch_1():  # last.pt is written by rename: never torn
        ck = torch.load(last, weights_only=True) if last.exists() else {}
        return (ck.get("state"), ck.get("next_epoch")) == (1, 1)
    wait_for(in_state_1_epoch_1)
    proc.send_signal(signal.SIGINT)  # Ctrl-C in the middle of state 1's second epoch
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    ck = torch.load(last, weights_only=True)
    assert (ck["state"], ck["next_epoch"]) == (1, 1) and 0 < ck["step"] < 31  # inside the epoch
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["status"], summary["states_done"]) == ("interrupted", 1)
    line = stdout.strip().splitlines()[-1]
    assert line.startswith(f"interrupted at state 1, epoch 1, step {ck['step']} (counted from 0); resume with: ")
    command = shlex.split(line.split("resume with: ", 1)[1])
    assert command[:4] == ["python", "-m", "vitprune", "run"] and command == shlex.split(summary["resume_command"])
    r = subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True, cwd=None)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"at state 1, epoch 1, step {ck['step']}" in r.stdout
    assert comparable(run_dir) == comparable(demo[0])
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"


def test_sigterm_stops_with_143(tmp_path):
    run_dir = tmp_path / "term"
    proc = subprocess.Popen([sys.executable, "-m", "vitprune", "run", *DEMO, f"--out_dir={tmp_path}", "--name=term"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (run_dir / "checkpoints" / "last.pt").exists())  # state 0 has started
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 143 and "Traceback" not in stderr
    assert "resume with: python -m vitprune run --resume" in stdout
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"
