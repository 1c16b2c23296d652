"""The ways to retrain a ticket, on real (tiny) runs: weight rewinding (--rewind=init),
learning-rate rewinding (--rewind=none), fine-tuning (--retrain_lr) and Scratch
(--rewind=random); and what every run records so that two runs of one seed can be paired:
the split and State-0 fingerprints, the numerics, ticket_epoch_flops."""
import hashlib
import json
import math
import signal

import pytest
import torch
from scipy.stats import kstest

from conftest import small_data
from vitprune import runtime, train
from vitprune.config import from_flags
from vitprune.data.synth import _synthetic_images, synthetic
from vitprune.model import build_model, fresh_weights
from vitprune.structure import Structure

SIZES = (96, 32, 32)  # train, val, test images of the synthetic set; batch 32: 3 steps per epoch
STEPS, BATCH = 3, 32
RUN = dict(method="refill", dataset="synthetic", model="vit_micro", ratio=0.5, states=2, epochs=1,
           batch_size=BATCH, wandb="disabled")
RUNS = {  # name: flags; every run but "final" trains the same State 0 (seed 0, one epoch)
    "init": dict(rewind="init"),                                    # weight rewinding
    "lr_rewind": dict(rewind="none", pruned_epochs=3),              # learning-rate rewinding
    "finetune": dict(rewind="none", pruned_epochs=3, retrain_lr="0.003"),
    "scratch": dict(rewind="random"),                               # Scratch-E
    "final": dict(rewind="none", retrain_lr="final", epochs=2, lr_schedule="cosine"),
}


def retrain(out, name, stop_at_step=None, **flags):
    """A run of RUN on SIZES, in this process; stop_at_step: SIGINT arrives at that step of the
    run (counted over all states) and the run stops there (exit 130)."""
    steps = []

    def requested(self, step, world, device):
        steps.extend([step] if step else [])  # step 0: the check at a state's start, not a step
        if len(steps) == stop_at_step:
            self.signum = signal.SIGINT
        return self.signum is not None
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runtime, "load_data", small_data(SIZES))
        mp.setattr(train.StopRequest, "requested", requested)
        return train.run(from_flags(dict(RUN, out_dir=str(out), name=name, **flags)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("retrain")
    return {name: retrain(out, name, **flags) for name, flags in RUNS.items()}


def records(run_dir, kind=None):
    rs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rs if kind is None or r["kind"] == kind]


def comparable(run_dir):
    """Every record without its wall-clock times."""
    return [{k: v for k, v in r.items() if not k.endswith("time_s")} for r in records(run_dir)]


def checkpoint(run_dir, name):
    return torch.load(run_dir / "checkpoints" / f"{name}.pt", weights_only=True)


def alive(w: torch.Tensor) -> torch.Tensor:
    """A weight's entries that are not pruned (a pruned group is exactly zero; a drawn one never is)."""
    return w[w != 0]


# ---- learning-rate rewinding ------------------------------------------------------------------

@pytest.mark.slow
def test_learning_rate_rewinding_run(runs):
    """--states=2 --rewind=none --pruned_epochs=3: State 0 trains --epochs, State 1 starts from
    State 0's trained weights with the ticket pruned (no rewind point) and trains 3 epochs on an LR
    schedule of 3 epochs, replayed from its start."""
    from test_rsst import plain_vit, zero_outside
    run_dir = runs["lr_rewind"]
    epochs = records(run_dir, "epoch")
    assert [(r["state"], r["epoch"], r["global_epoch"]) for r in epochs] == [(0, 0, 0), (1, 0, 1), (1, 1, 2), (1, 2, 3)]
    # multistep over the state's 3 epochs: x0.1 from epoch 1.5 on (the default lr is 0.01)
    assert [r["lr"] for r in epochs[1:]] == pytest.approx([0.01, 0.01, 0.001])
    assert not (run_dir / "checkpoints" / "rewind.pt").exists()
    keep = Structure.from_state_dict(checkpoint(run_dir, "state_01")["structure"])
    assert int(keep.heads.sum()) == 8 and int(keep.neurons.sum()) == 256  # ratio 0.5 of 16 heads, 512 neurons
    data = synthetic(0, sizes=SIZES)
    with torch.no_grad():  # State 1's start: State 0's trained weights, pruned; a plain timm ViT
        model = plain_vit(zero_outside(checkpoint(run_dir, "state_00")["model"], keep))
        x = (data.val_x.float() / 255 - 0.5) / 0.5
        start = 100.0 * int((model(x).argmax(1) == data.val_y).sum()) / len(data.val_y)
    assert records(run_dir)[-1]["start_val_acc"] == start


@pytest.mark.slow
def test_learning_rate_rewinding_resumes_exactly(runs, tmp_path):
    """Stopped in the middle of the retraining's second epoch (step 8 of the run), resumed: the
    same records as the uninterrupted run."""
    with pytest.raises(SystemExit) as stopped:
        retrain(tmp_path, "lr_rewind", stop_at_step=8, **RUNS["lr_rewind"])
    assert stopped.value.code == 130
    ck = checkpoint(tmp_path / "lr_rewind", "last")
    assert (ck["state"], ck["next_epoch"], ck["step"]) == (1, 1, 2)  # inside state 1's second epoch
    retrain(tmp_path, "lr_rewind", resume=True, **RUNS["lr_rewind"])
    assert comparable(tmp_path / "lr_rewind") == comparable(runs["lr_rewind"])


# ---- fine-tuning: --retrain_lr ------------------------------------------------------------------

@pytest.mark.slow
def test_fine_tuning_trains_states_after_0_at_the_rate_asked_for(runs):
    """--retrain_lr=0.003: every epoch of state 1 ran at 0.003 (the recorded lr is the epoch's last
    step's); State 0 followed --lr_schedule. final: State 0's last rate, under cosine near zero."""
    epochs = records(runs["finetune"], "epoch")
    assert [r["lr"] for r in epochs if r["state"] >= 1] == [0.003] * 3
    assert epochs[0]["lr"] == 0.01  # State 0: multistep, one epoch: no drop
    final = records(runs["final"], "epoch")
    last = [r for r in final if r["state"] == 0][-1]["lr"]
    # cosine over State 0's 2 × 3 steps: its last step runs at lr · (1 + cos(5π/6)) / 2
    assert last == pytest.approx(0.01 * (1 + math.cos(5 * math.pi / 6)) / 2, rel=1e-12) and last < 0.001
    assert [r["lr"] for r in final if r["state"] >= 1] == [last] * 2
    # learning-rate rewinding, the same run without --retrain_lr, replays the schedule instead
    assert [r["lr"] for r in records(runs["lr_rewind"], "epoch") if r["state"] >= 1] != [0.003] * 3


@pytest.mark.slow
def test_fine_tuning_resumes_exactly(runs, tmp_path):
    """The constant rate survives --resume: stopped at step 5 (state 1's first epoch), resumed."""
    with pytest.raises(SystemExit):
        retrain(tmp_path, "finetune", stop_at_step=5, **RUNS["finetune"])
    assert checkpoint(tmp_path / "finetune", "last")["state"] == 1
    retrain(tmp_path, "finetune", resume=True, **RUNS["finetune"])
    assert comparable(tmp_path / "finetune") == comparable(runs["finetune"])


# ---- Scratch: --rewind=random -------------------------------------------------------------------

def test_fresh_weights_are_their_own_stream():
    """model.fresh_weights: the same for one (seed, state), another for another state or seed, no
    seed's θ0, and the global RNG left as it was."""
    before = torch.get_rng_state()
    a, b = fresh_weights("vit_micro", 10, 32, 4, 0, 1), fresh_weights("vit_micro", 10, 32, 4, 0, 1)
    assert torch.equal(torch.get_rng_state(), before)
    key = "blocks.0.attn.qkv.weight"
    assert all(torch.equal(a[k], b[k]) for k in a)
    for seed, state in ((0, 2), (1, 1)):
        assert not torch.equal(fresh_weights("vit_micro", 10, 32, 4, seed, state)[key], a[key])
    torch.manual_seed(0)  # seed 0's θ0
    assert not torch.equal(build_model("vit_micro", 10).state_dict()[key], a[key])


@pytest.mark.slow
def test_scratch_keeps_the_tickets_structure_on_a_fresh_init(runs):
    """--rewind=random: state 1 prunes the same keep set as weight rewinding (both select from the
    same State 0), and starts from weights that are neither State 0's trained ones nor the θ0 of any
    seed in 0..9, drawn as timm inits a ViT: linears ~ N(0, 0.02), biases zero."""
    scratch, init = runs["scratch"], runs["init"]
    structure = lambda run_dir: checkpoint(run_dir, "state_01")["structure"]
    assert all(torch.equal(structure(scratch)[k], structure(init)[k]) for k in ("heads", "neurons"))
    start = checkpoint(scratch, "start_01")["model"]
    trained = checkpoint(scratch, "state_00")["model"]
    linears = [k for k in start if k.startswith("blocks.") and k.endswith(("qkv.weight", "proj.weight",
                                                                           "fc1.weight", "fc2.weight"))]
    drawn = torch.cat([alive(start[k]) for k in linears])
    assert kstest(drawn.numpy(), "norm", args=(0.0, 0.02)).pvalue > 0.01
    biases = [k.replace("weight", "bias") for k in linears]
    assert not any(start[k].any() for k in biases) and all(trained[k].any() for k in biases)  # training moved them
    key = "blocks.0.mlp.fc1.weight"
    kept = start[key] != 0
    assert (start[key][kept] == trained[key][kept]).float().mean() < 0.01
    for seed in range(10):
        torch.manual_seed(seed)  # how a run of that seed draws θ0 (runtime.setup)
        theta0 = build_model("vit_micro", 10).state_dict()
        assert (start[key][kept] == theta0[key][kept]).float().mean() < 0.01, seed
    # the pruned groups are zero: the ticket's structure is applied to the fresh init
    keep = Structure.from_state_dict(structure(scratch))
    assert not start[key][~keep.neurons[0]].any() and kept.any(1).sum() == keep.neurons[0].sum()


@pytest.mark.slow
@pytest.mark.parametrize("lost", [(), ("last", "start_01")])
def test_scratch_resumes_from_the_same_weights(runs, tmp_path, lost):
    """Stopped inside state 1 and resumed, from last.pt, or with last.pt and start_01.pt gone (the
    transition is redone from state_00.pt and draws the fresh init again): state 1 starts from the
    same weights and the run ends with the same records."""
    with pytest.raises(SystemExit):
        retrain(tmp_path, "scratch", stop_at_step=5, **RUNS["scratch"])
    for name in lost:
        for path in (tmp_path / "scratch" / "checkpoints").glob(f"{name}.pt*"):
            path.unlink()
    retrain(tmp_path, "scratch", resume=True, **RUNS["scratch"])
    ours, theirs = checkpoint(tmp_path / "scratch", "start_01")["model"], checkpoint(runs["scratch"], "start_01")["model"]
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert comparable(tmp_path / "scratch") == comparable(runs["scratch"])


# ---- what a run records for pairing and for compute ---------------------------------------------

def sha256_of_weights(state_dict) -> str:
    """The documented fingerprint, written out: name, dtype, shape and bytes of every tensor, by name."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode() + t.numpy().tobytes())
    return h.hexdigest()


@pytest.mark.slow
def test_records_carry_the_numerics_and_the_fingerprints(runs):
    """Every state record and summary.json: precision, device type and kernel backend as resolved on
    this CPU; split_fingerprint, the same for every run of the seed, recomputed from which pool images
    are the val split; state0_fingerprint, recomputed from state_00.pt, the same for every run that
    trained that State 0 and another for another State 0."""
    data = synthetic(0, sizes=SIZES)
    pool = _synthetic_images(sum(SIZES), 10, torch.Generator().manual_seed(0))[0][:SIZES[0] + SIZES[1]]
    val_ids = [int((pool == x).flatten(1).all(1).nonzero()) for x in data.val_x]
    split = hashlib.sha256(json.dumps({"val": val_ids, "test": list(range(SIZES[2]))}).encode()).hexdigest()
    for name, run_dir in runs.items():
        summary = json.loads((run_dir / "summary.json").read_text())
        state0 = sha256_of_weights(checkpoint(run_dir, "state_00")["model"])
        for r in [summary, *records(run_dir, "state")]:
            assert (r["precision"], r["device_type"], r["kernels_backend"]) == ("fp32", "cpu", "torch"), name
            assert r["split_fingerprint"] == split and r["state0_fingerprint"] == state0, name
    shared = {json.loads((runs[n] / "summary.json").read_text())["state0_fingerprint"] for n in RUNS if n != "final"}
    assert len(shared) == 1 and json.loads((runs["final"] / "summary.json").read_text())["state0_fingerprint"] not in shared


@pytest.mark.slow
def test_ticket_epoch_flops_is_an_epoch_of_the_final_network(runs):
    """ticket_epoch_flops: steps × batch × (forward + backward = 3 forwards) of the state's final
    network, from vit_micro's FLOPs by hand; a one-state retraining of P epochs spends P of them."""
    from test_recipe import hand_forward_flops
    for name in ("init", "lr_rewind", "scratch"):
        states = records(runs[name], "state")
        keep = Structure.from_state_dict(checkpoint(runs[name], "state_01")["structure"])
        ticket = hand_forward_flops(keep.heads.sum(1).tolist(), keep.neurons.sum(1).tolist())
        assert states[0]["ticket_epoch_flops"] == STEPS * BATCH * 3 * hand_forward_flops([4] * 4, [128] * 4)
        assert states[1]["ticket_epoch_flops"] == STEPS * BATCH * 3 * ticket
        epochs = RUNS[name].get("pruned_epochs", 1)
        assert states[1]["train_flops"] - states[0]["train_flops"] == epochs * states[1]["ticket_epoch_flops"]
