"""RSST really forms the structure and reports the pruned network; imp and dense baselines."""
import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import kill_mid_state
from vitprune.config import from_flags
from vitprune.data import eval_batches, synthetic
from vitprune.methods import reg_lambda
from vitprune.model import build_model
from vitprune.structure import PRUNABLE_WEIGHTS, Structure, apply_structure, set_live
from vitprune.train import run

E = math.e


@pytest.mark.parametrize("schedule, formula", [
    ("x", lambda p, g, k: g * p),
    ("x^2", lambda p, g, k: g * p ** 2),
    ("x^3", lambda p, g, k: g * p ** 3),
    ("exp", lambda p, g, k: g * (E ** p - 1) / (E - 1)),
    ("exp_custom", lambda p, g, k: g * (E ** p - 1) / (E - 1)),
    ("exp_custom_exponents", lambda p, g, k: g * (E ** (p ** k) - 1) / (E - 1)),
])
def test_lambda_schedules(schedule, formula):
    for g, k in ((1.0, 4.0), (0.3, 2.0)):
        for p in (0.01, 0.25, 0.5, 0.9, 1.0):
            assert reg_lambda(schedule, p, g, k) == pytest.approx(formula(p, g, k), rel=1e-12)
        assert reg_lambda(schedule, 1.0, g, k) == pytest.approx(g)


COMMON = dict(dataset="synthetic", model="vit_micro", states=2, epochs=2, ratio=0.5, wandb="disabled")
STRONG = dict(COMMON, method="rsst", reg_granularity_prune=20.0, reg_schedule="x")


def metrics(run_dir, kind=None):
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if kind is None or r["kind"] == kind]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("rsst")
    dirs = {}
    for name, flags in {"strong": STRONG, "off": dict(STRONG, reg_granularity_prune=0.0),
                        "refill": dict(COMMON, method="refill")}.items():
        dirs[name] = run(from_flags(dict(flags, out_dir=str(out), name=name)))
    return dirs


def val_logits(model):
    data = synthetic(0)
    with torch.no_grad():
        return torch.cat([model(x) for x, _ in eval_batches(data.val_x, data.val_y)])


def hard_prune_shift(run_dir):
    """Relative L2 change of the validation logits caused by the hard prune at the end of state 1."""
    ck = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)  # just before the prune
    assert (ck["state"], ck["epochs_done"]) == (1, 2)
    model = build_model("vit_micro", 10).eval()
    model.load_state_dict(ck["model"])
    set_live(model, Structure.from_state_dict(ck["structure"]))
    before = val_logits(model)
    apply_structure(model, Structure.from_state_dict(ck["keep"]))
    after = val_logits(model)
    return float((after - before).norm() / before.norm())


def test_strong_rsst_drives_targets_to_zero(runs):
    epochs = [r for r in metrics(runs["strong"], "epoch") if r["state"] == 1]
    assert epochs[-1]["reg_lambda"] == pytest.approx(20.0)  # λ(1) = g: λ grows over the whole state
    assert epochs[0]["reg_lambda"] == pytest.approx(10.0)
    assert epochs[-1]["target_norm_ratio"] < 0.05
    state1 = metrics(runs["strong"], "state")[1]
    assert state1["target_norm_ratio"] < 0.05
    assert {"pre_prune_val_acc", "pre_prune_test_acc", "final_val_acc"} <= state1.keys()
    assert hard_prune_shift(runs["strong"]) < 0.05


def test_without_penalty_the_hard_prune_hurts(runs):
    epochs = [r for r in metrics(runs["off"], "epoch") if r["state"] == 1]
    assert epochs[-1]["reg_lambda"] == 0.0
    assert epochs[-1]["target_norm_ratio"] > 0.8
    assert hard_prune_shift(runs["off"]) > 0.2


def test_rsst_reports_the_pruned_network(runs):
    rsst, refill = metrics(runs["strong"], "state")[1], metrics(runs["refill"], "state")[1]
    assert rsst["params_alive"] == refill["params_alive"] < rsst["params_total"]
    a = torch.load(runs["strong"] / "checkpoints" / "state_01.pt", weights_only=False)
    b = torch.load(runs["refill"] / "checkpoints" / "state_01.pt", weights_only=False)
    assert torch.equal(a["structure"]["heads"], b["structure"]["heads"])  # same keep sets
    assert torch.equal(a["structure"]["neurons"], b["structure"]["neurons"])
    # The saved RSST network is hard-pruned: its dead neurons are exactly zero.
    dead = ~a["structure"]["neurons"][0]
    assert a["model"]["blocks.0.mlp.fc1.weight"][dead].abs().sum() == 0


def test_imp_reaches_the_scheduled_sparsity_and_dense_keeps_everything(tmp_path):
    imp = run(from_flags(dict(COMMON, method="imp", epochs=1, out_dir=str(tmp_path), name="imp")))
    ck = torch.load(imp / "checkpoints" / "state_01.pt", weights_only=False)
    weights = [ck["model"][f"blocks.{l}.{n}"] for l in range(4) for n in PRUNABLE_WEIGHTS]
    total = sum(w.numel() for w in weights)
    assert sum(int((w == 0).sum()) for w in weights) == round(0.5 * total)  # global, exact
    state1 = metrics(imp, "state")[1]
    assert state1["params_alive"] == state1["params_total"] - round(0.5 * total)
    dense = run(from_flags(dict(COMMON, method="dense", epochs=1, out_dir=str(tmp_path), name="dense")))
    for r in metrics(dense, "state"):
        assert r["params_alive"] == r["params_total"] and r["heads_alive"] == r["heads_total"]


def test_sigkill_mid_rsst_state_then_resume(runs, tmp_path):
    flags = [f"--{k}={v}" for k, v in STRONG.items()] + [f"--out_dir={tmp_path}", "--name=strong"]
    cmd = [sys.executable, "-m", "vitprune", "run", *flags]
    kill_mid_state(cmd, tmp_path / "strong", state=1, epochs_done=1)  # mid-RSST state: λ, targets in flight
    r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "at state 1, epoch 1" in r.stdout
    strip = lambda rows: [{k: v for k, v in x.items() if k != "time_s"} for x in rows]
    assert strip(metrics(tmp_path / "strong")) == strip(metrics(runs["strong"]))
