"""RSST really forms the structure with its defaults and reports the pruned network; the
seed's formula; late rewinding; imp and dense baselines. Every reported accuracy is checked
against a plain timm VisionTransformer loaded from the saved checkpoint."""
import json
import math
import subprocess
import sys

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from conftest import kill_mid_state
from vitprune.config import from_flags
from vitprune.errors import ConfigError
from vitprune.data.synth import synthetic
from vitprune.methods import RsstRegularizer, reg_lambda, residual_coefficient
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


@pytest.mark.parametrize("steps", [10, 93, 21060])
@pytest.mark.parametrize("residual", [1e-3, 0.3])
def test_residual_coefficient_leaves_the_residual(steps, residual):
    shape = [reg_lambda("exp_custom_exponents", t / steps, 1.0, 4.0) for t in range(1, steps + 1)]
    c = residual_coefficient(shape, residual)
    left = math.prod(1 - c * s for s in shape)
    assert 0 < c < 1 and left == pytest.approx(residual, rel=1e-6)
    assert residual_coefficient(shape, 1.0) == 0.0  # residual 1: no penalty


COMMON = dict(dataset="synthetic", model="vit_micro", states=2, epochs=2, ratio=0.5, wandb="disabled")
SGD = dict(optimizer="sgd", lr_schedule="multistep")  # the seed's recipe: lr 0.01, x0.1 at 50% and 75%
ADAMW = dict(optimizer="adamw", lr=1e-3, lr_schedule="cosine")
RUNS = {
    "sgd": dict(COMMON, **SGD, method="rsst"),       # every RSST flag at its default
    "adamw": dict(COMMON, **ADAMW, method="rsst"),
    "sgd_off": dict(COMMON, **SGD, method="rsst", reg_residual=1.0),    # the same, penalty off
    "adamw_off": dict(COMMON, **ADAMW, method="rsst", reg_residual=1.0),
    "seed": dict(COMMON, method="rsst", reg_formula="seed", reg_granularity_prune=20.0, reg_schedule="x"),
    "reach": dict(COMMON, **SGD, method="rsst", reg_reach=0.25),  # targets pruned a quarter into the state
    "refill": dict(COMMON, **SGD, method="refill"),
    "imp": dict(COMMON, **SGD, method="imp"),
}


def metrics(run_dir, kind=None):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if kind is None or r["kind"] == kind]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{name: run folder} of RUNS, each run the first time a test asks for it."""
    out = tmp_path_factory.mktemp("rsst")

    class Runs(dict):
        def __missing__(self, name):
            self[name] = run(from_flags(dict(RUNS[name], out_dir=str(out), name=name)))
            return self[name]
    return Runs()


def hard_prune_effect(run_dir):
    """(target_norm_ratio, change of val accuracy in points) of the hard prune of state 1."""
    state1 = metrics(run_dir, "state")[1]
    return state1["target_norm_ratio"], abs(state1["final_val_acc"] - state1["pre_prune_val_acc"])


def targets_zeroed(run_dir) -> bool:
    ratio, val_change = hard_prune_effect(run_dir)
    return ratio <= 0.05 and val_change <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_default_rsst_drives_its_targets_to_zero(runs, optimizer):
    assert targets_zeroed(runs[optimizer]), hard_prune_effect(runs[optimizer])
    # the twin without the penalty fails the same check: the check can fail
    assert not targets_zeroed(runs[f"{optimizer}_off"]), hard_prune_effect(runs[f"{optimizer}_off"])
    epochs = [r for r in metrics(runs[optimizer], "epoch") if r["state"] == 1]
    assert epochs[0]["reg_lambda"] < epochs[-1]["reg_lambda"] < 1  # a growing per-step shrink


@pytest.mark.slow
def test_seed_formula(runs):
    epochs = [r for r in metrics(runs["seed"], "epoch") if r["state"] == 1]
    assert epochs[-1]["reg_lambda"] == pytest.approx(20.0)  # λ(1) = g: λ grows over the whole state
    assert epochs[0]["reg_lambda"] == pytest.approx(10.0)
    assert targets_zeroed(runs["seed"])


def test_seed_formula_that_would_diverge_is_refused():
    # SGD with momentum 0.9 diverges once lr·g >= 2·1.9 = 3.8; AdamW's shrink once lr·g >= 2
    with pytest.raises(ConfigError, match="--reg_granularity_prune: .* diverges"):
        from_flags(dict(method="rsst", reg_formula="seed", lr=0.01, reg_granularity_prune=400.0))
    from_flags(dict(method="rsst", reg_formula="seed", lr=0.01, reg_granularity_prune=370.0))
    with pytest.raises(ConfigError, match="--reg_granularity_prune"):
        from_flags(dict(method="rsst", reg_formula="seed", optimizer="adamw", lr=1e-3, reg_granularity_prune=2500.0))


def plain_vit(state_dict) -> VisionTransformer:
    """timm's own VisionTransformer (vit_micro's shape), no vitprune code in its forward."""
    model = VisionTransformer(img_size=32, patch_size=4, num_classes=10, embed_dim=64, depth=4, num_heads=4,
                              mlp_ratio=2.0, qkv_bias=True)
    model.load_state_dict(state_dict)
    return model.eval()


@torch.no_grad()
def val_accuracy(model) -> float:
    data = synthetic(0)  # the runs' seed-0 split
    x = (data.val_x.float() / 255 - 0.5) / 0.5
    return 100.0 * int((model(x).argmax(1) == data.val_y).sum()) / len(data.val_y)


def zero_outside(state_dict, keep: Structure, heads=4, head_dim=16):
    """The weights with every head and neuron outside `keep` zeroed (timm's qkv layout)."""
    sd = {k: v.clone() for k, v in state_dict.items()}
    for l in range(keep.heads.shape[0]):
        p = f"blocks.{l}."
        for h in (~keep.heads[l]).nonzero().flatten().tolist():
            for j in range(3):  # q, k, v rows of head h
                rows = slice((j * heads + h) * head_dim, (j * heads + h + 1) * head_dim)
                sd[p + "attn.qkv.weight"][rows] = 0
                sd[p + "attn.qkv.bias"][rows] = 0
            sd[p + "attn.proj.weight"][:, h * head_dim:(h + 1) * head_dim] = 0
        dead = ~keep.neurons[l]
        sd[p + "mlp.fc1.weight"][dead] = 0
        sd[p + "mlp.fc1.bias"][dead] = 0
        sd[p + "mlp.fc2.weight"][:, dead] = 0
    return sd


@pytest.mark.slow
@pytest.mark.parametrize("name", ["refill", "sgd_off", "imp", "reach"])
def test_reported_final_accuracy_is_the_saved_pruned_network(runs, name):
    """state_01.pt in a plain timm ViT gives the state record's final_val_acc exactly. For RSST
    the run without penalty is used, so the hard prune visibly changes the accuracy."""
    ck = torch.load(runs[name] / "checkpoints" / "state_01.pt", weights_only=True)
    record = metrics(runs[name], "state")[1]
    assert val_accuracy(plain_vit(ck["model"])) == record["final_val_acc"]
    if name == "sgd_off":
        assert record["pre_prune_val_acc"] != record["final_val_acc"]  # the hard prune matters here


@pytest.mark.slow
def test_rsst_epoch_accuracy_is_the_network_without_its_targets(runs):
    """The last epoch record of an RSST state: the weights of last.pt (just before the hard
    prune) with every group outside the saved keep set zeroed, in a plain timm ViT."""
    ck = torch.load(runs["sgd_off"] / "checkpoints" / "last.pt", weights_only=True)
    assert (ck["state"], ck["next_epoch"]) == (1, 2)
    keep, alive = Structure.from_state_dict(ck["keep"]), Structure.from_state_dict(ck["alive"])
    assert int(alive.heads.sum()) > int(keep.heads.sum())  # the targets were still alive
    record = [r for r in metrics(runs["sgd_off"], "epoch") if r["state"] == 1][-1]
    assert val_accuracy(plain_vit(zero_outside(ck["model"], keep))) == record["val_acc"]
    assert val_accuracy(plain_vit(ck["model"])) != record["val_acc"]  # with the targets it differs


@pytest.mark.slow
def test_rsst_keeps_what_refill_keeps(runs):
    rsst, refill = metrics(runs["sgd"], "state")[1], metrics(runs["refill"], "state")[1]
    assert rsst["params_alive"] == refill["params_alive"] < rsst["params_total"]
    a = torch.load(runs["sgd"] / "checkpoints" / "state_01.pt", weights_only=True)
    b = torch.load(runs["refill"] / "checkpoints" / "state_01.pt", weights_only=True)
    assert torch.equal(a["structure"]["heads"], b["structure"]["heads"])  # same keep sets
    assert torch.equal(a["structure"]["neurons"], b["structure"]["neurons"])
    dead = ~a["structure"]["neurons"][0]  # the saved RSST network is hard-pruned
    assert a["model"]["blocks.0.mlp.fc1.weight"][dead].abs().sum() == 0


@pytest.mark.slow
def test_imp_reaches_the_scheduled_sparsity_and_dense_keeps_everything(runs, tmp_path):
    ck = torch.load(runs["imp"] / "checkpoints" / "state_01.pt", weights_only=True)
    weights = [ck["model"][f"blocks.{l}.{n}"] for l in range(4) for n in PRUNABLE_WEIGHTS]
    total = sum(w.numel() for w in weights)
    assert sum(int((w == 0).sum()) for w in weights) == round(0.5 * total)  # global, exact
    state1 = metrics(runs["imp"], "state")[1]
    assert state1["params_alive"] == state1["params_total"] - round(0.5 * total)
    dense = run(from_flags(dict(COMMON, method="dense", epochs=1, out_dir=str(tmp_path), name="dense")))
    for r in metrics(dense, "state"):
        assert r["params_alive"] == r["params_total"] and r["heads_alive"] == r["heads_total"]


@pytest.mark.slow
def test_late_rewinding_continues_the_schedule_from_epoch_k(tmp_path):
    """--rewind=epoch:1: state 1 starts from the weights, optimizer and LR of epoch 1 of state 0
    and trains epochs 1..E-1; its dead groups stay exactly zero (momentum included)."""
    flags = dict(COMMON, method="refill", epochs=3, lr_schedule="cosine", rewind="epoch:1")
    run_dir = run(from_flags(dict(flags, out_dir=str(tmp_path), name="late")))
    epochs = metrics(run_dir, "epoch")
    state0, state1 = [r for r in epochs if r["state"] == 0], [r for r in epochs if r["state"] == 1]
    assert [r["epoch"] for r in state0] == [0, 1, 2] and [r["epoch"] for r in state1] == [1, 2]
    assert state1[0]["lr"] == state0[1]["lr"] and state1[1]["lr"] == state0[2]["lr"]
    assert len({r["lr"] for r in state0}) == 3  # cosine: every epoch its own lr
    # last.pt: the weights after state 1's last step, before the end of the state zeroes anything
    ck = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert (ck["state"], ck["next_epoch"]) == (1, 3)
    model = build_model("vit_micro", 10)
    model.load_state_dict(ck["model"])
    structure = Structure.from_state_dict(ck["alive"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_structure(model, structure)  # zeroing the dead groups changes nothing: they are zero
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert metrics(run_dir, "state")[1]["params_alive"] < metrics(run_dir, "state")[0]["params_alive"]


@pytest.mark.slow
def test_sigkill_mid_rsst_state_then_resume(runs, tmp_path):
    flags = [f"--{k}={v}" for k, v in RUNS["sgd"].items()] + [f"--out_dir={tmp_path}", "--name=sgd"]
    cmd = [sys.executable, "-m", "vitprune", "run", *flags]
    kill_mid_state(cmd, tmp_path / "sgd", state=1, next_epoch=1)  # mid-RSST state: λ, targets in flight
    r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "at state 1, epoch 1" in r.stdout
    strip = lambda rows: [{k: v for k, v in x.items() if not k.endswith("time_s")} for x in rows]
    assert strip(metrics(tmp_path / "sgd")) == strip(metrics(runs["sgd"]))


def test_evaluation_as_structure_equals_zeroed_weights():
    """set_live (what an RSST epoch evaluates) computes what zeroing the groups computes."""
    torch.manual_seed(0)
    model = build_model("vit_micro", 10).eval()
    keep = Structure(torch.rand(4, 4) < 0.5, torch.rand(4, 128) < 0.5)
    keep.heads[:, 0] = keep.neurons[:, 0] = True
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        set_live(model, keep)
        live = model(x)
        apply_structure(model, keep)
        torch.testing.assert_close(model(x), live)


@pytest.mark.slow
def test_reg_reach_prunes_the_targets_early_then_trains_the_pruned_network(runs):
    """--reg_reach=0.25: the targets reach the residual a quarter into state 1 and are removed
    there; the rest of the state trains (the LR goes on) with no penalty and no targets."""
    state1 = metrics(runs["reach"], "state")[1]
    assert state1["pruned_at"] == pytest.approx(0.25, abs=0.02)
    assert state1["target_norm_ratio"] <= 0.05 and state1["target_norm_ratio_max"] <= 0.1
    e0, e1 = [r for r in metrics(runs["reach"], "epoch") if r["state"] == 1]
    assert e0["reg_lambda"] > 0 and e0["target_norm_ratio"] == state1["target_norm_ratio"]  # pruned in epoch 0
    assert e1["reg_lambda"] == e1["target_norm_ratio"] == e1["target_norm_ratio_max"] == 0.0 and e1["lr"] > 0
    # the state's second half trained the pruned network: its targets are zero in last.pt and the
    # network the epoch evaluated is the saved one (a plain timm ViT, no vitprune code)
    ck = torch.load(runs["reach"] / "checkpoints" / "last.pt", weights_only=True)
    assert (ck["state"], ck["next_epoch"]) == (1, 2)
    alive, keep = Structure.from_state_dict(ck["alive"]), Structure.from_state_dict(ck["keep"])
    assert torch.equal(alive.heads, keep.heads) and torch.equal(alive.neurons, keep.neurons)
    assert val_accuracy(plain_vit(ck["model"])) == e1["val_acc"]
    dead = ~keep.neurons[0]
    assert dead.any() and ck["model"]["blocks.0.mlp.fc1.weight"][dead].abs().sum() == 0
    # the default (reach 1) prunes at the end
    assert metrics(runs["sgd"], "state")[1]["pruned_at"] == 1.0


@pytest.mark.slow
def test_sigkill_after_the_early_prune_then_resume(runs, tmp_path):
    """Killed in epoch 1 of state 1, after --reg_reach=0.25 removed the targets in epoch 0: the
    resumed run gives the uninterrupted run's records."""
    flags = [f"--{k}={v}" for k, v in RUNS["reach"].items()] + [f"--out_dir={tmp_path}", "--name=reach"]
    cmd = [sys.executable, "-m", "vitprune", "run", *flags]
    kill_mid_state(cmd, tmp_path / "reach", state=1, next_epoch=1)
    ck = torch.load(tmp_path / "reach" / "checkpoints" / "last.pt", weights_only=True)
    assert ck["pruned"] is not None and torch.equal(ck["alive"]["heads"], ck["keep"]["heads"])  # after the prune
    r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    strip = lambda rows: [{k: v for k, v in x.items() if not k.endswith("time_s")} for x in rows]
    assert strip(metrics(tmp_path / "reach")) == strip(metrics(runs["reach"]))


@pytest.mark.slow
def test_a_target_group_the_gradient_holds_up_is_warned_though_the_aggregate_is_small(tmp_path, monkeypatch,
                                                                                     capsys):
    """One target neuron is put back to its weights at the start of the state after every step
    (as if the gradient held it up): all targets together fall below 0.1 of their norm, the
    largest group keeps all of its own; the state record says so and the run warns."""
    init, after, held = RsstRegularizer.__init__, RsstRegularizer.after_step, {}

    def group(self):  # the weights of the first target neuron
        layer, neuron = (int(i) for i in self.neurons.nonzero()[0])
        return (self.params.fc1_w[layer][neuron], self.params.fc1_b[layer][neuron:neuron + 1],
                self.params.fc2_w[layer][:, neuron])

    def init_and_hold(self, *args, **kwargs):  # its weights at the start of the state
        init(self, *args, **kwargs)
        held[id(self)] = [t.detach().clone() for t in group(self)]

    @torch.no_grad()
    def after_step_and_restore(self, step, lr):
        after(self, step, lr)
        for t, s in zip(group(self), held[id(self)]):
            t.copy_(s)
    monkeypatch.setattr(RsstRegularizer, "__init__", init_and_hold)
    monkeypatch.setattr(RsstRegularizer, "after_step", after_step_and_restore)
    run_dir = run(from_flags(dict(RUNS["sgd"], out_dir=str(tmp_path), name="held")))
    state1 = metrics(run_dir, "state")[1]
    assert state1["target_norm_ratio"] < 0.1
    assert state1["target_norm_ratio_max"] == pytest.approx(1.0, abs=1e-6)  # put back exactly: all its norm
    assert "warning: RSST targets not driven to zero" in capsys.readouterr().out


@pytest.mark.slow
def test_report_of_an_rsst_run_draws_its_diagnostics(runs, tmp_path, monkeypatch):
    """The report of RSST runs (and a Refill run, which gets no such figure) holds one
    diagnostics figure per RSST configuration, with the LR, the coefficient, both norm ratios,
    the val accuracy without the targets and the hard prune drawn."""
    from vitprune import report
    from vitprune.report import plots
    drawn, draw = [], plots.rsst_diagnostics

    def record(title, group, path, **kwargs):
        labels = draw(title, group, path, **kwargs)
        drawn.append((path, {r.name for r in group}, labels))
        return labels
    monkeypatch.setattr(plots, "rsst_diagnostics", record)
    out = tmp_path / "report.md"
    report.main(str(runs["reach"]), str(runs["sgd"]), str(runs["refill"]), out=str(out))
    assert sorted(names for _, names, _ in drawn) == [{"reach"}, {"sgd"}]  # one per RSST configuration
    md = out.read_text()
    for path, _, labels in drawn:
        assert path.is_file() and path.stat().st_size > 1000 and f"]({path.name})" in md
        assert labels == [*plots.RSST_SERIES, "hard prune"]


@torch.no_grad()
def test_norm_ratios_give_all_targets_and_the_largest_group():
    """A head shrunk to 1% and ten neurons to 1%, one of them only to 60%: the aggregate ratio
    (recomputed from the weights' slices) is small, the largest group's ratio is 0.6."""
    from vitprune.kernels import reference
    torch.manual_seed(0)
    model = build_model("vit_micro", 10)
    keep = Structure.full(model)
    keep.heads[1, 2], keep.neurons[0, :10] = False, False  # the targets
    reg = RsstRegularizer(model, keep, 10, reg_schedule="x", group_reg=reference.group_reg)
    attn, mlp = model.blocks[1].attn, model.blocks[0].mlp
    head = [attn.qkv.weight[(j * 4 + 2) * 16:(j * 4 + 3) * 16] for j in range(3)] + \
           [attn.qkv.bias[(j * 4 + 2) * 16:(j * 4 + 3) * 16] for j in range(3)] + [attn.proj.weight[:, 32:48]]
    groups = [(head, 0.01)] + [([mlp.fc1.weight[n], mlp.fc1.bias[n:n + 1], mlp.fc2.weight[:, n]], 0.6 if n == 3
                                else 0.01) for n in range(10)]
    start = [sum(float(t.square().sum()) for t in ts) for ts, _ in groups]
    for ts, f in groups:
        for t in ts:
            t.mul_(f)
    ratio, largest = reg.norm_ratios()
    expected = (sum(s * f ** 2 for s, (_, f) in zip(start, groups)) / sum(start)) ** 0.5
    assert ratio == pytest.approx(expected, rel=1e-5) and ratio < 0.1
    assert largest == pytest.approx(0.6, rel=1e-5)
