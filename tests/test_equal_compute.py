"""Equal compute on planted records: the --pruned_epochs of equal compute for every loop shape
(2-state, geometric, --reg_reach < 1 RSST loops, a teacher), from FLOPs counted here by hand from
vit_micro's shapes; the four ways of retraining compared pairwise at equal compute, Holm-corrected
together; pairs whose splits differ refused."""
import json

import pytest
from scipy.stats import ttest_rel

from vitprune import report
from vitprune.config import Config
from vitprune.report import compute

P = 1e15


@pytest.fixture(autouse=True)
def no_wandb_online(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")


# ---- FLOPs by hand: vit_micro (width 64, depth 4, 4 heads of 16, 128 neurons a layer) at 16 px,
# patch 4 (16 patches + the class token), 10 classes; a forward's matmul FLOPs (2 per multiply-add).
N, D, HD = 17, 64, 16
PATCH, HEAD = 2 * 16 * (3 * 4 * 4) * D, 2 * D * 10
PER_HEAD = 2 * N * (4 * HD * D + 2 * N * HD)  # qkv and proj, q·kᵀ and attn·v, over the tokens
PER_NEURON = 2 * N * (2 * D)                  # fc1 and fc2
IMAGES = 4050                                 # per epoch


def forward(heads, neurons):
    """Forward FLOPs per image of vit_micro with these heads and neurons alive (of 16 and 512)."""
    return PATCH + HEAD + heads * PER_HEAD + neurons * PER_NEURON


DENSE = forward(16, 512)
TICKET = forward(5, 154)  # ratio 0.7: round(0.3 × 16) heads, round(0.3 × 512) neurons
HALF = forward(9, 280)    # geometric, 3 states: state 1 keeps 0.3^(1/2)


def loop_run(root, name, states, flags, with_ticket=True, teacher=0):
    """A run folder whose records carry the training FLOPs of the loop `states`: per state (epochs,
    [(share of the epochs, forward FLOPs of the network that trains)], the forward FLOPs of its
    final network). Each step costs 3 forwards (+ a teacher's forward in states >= 1).
    with_ticket: the records carry `ticket_epoch_flops` (older ones do not)."""
    cfg = Config(**{"method": "rsst", "dataset": "synthetic", "model": "vit_micro", "img_size": 16,
                    "states": len(states), "seed": 0, **flags}).to_dict()
    run_dir = root / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(cfg))
    records, spent = [], 0.0
    for s, (epochs, phases, final) in enumerate(states):
        extra = teacher if s else 0
        spent += sum(epochs * share * IMAGES * (3 * f + extra) for share, f in phases)
        records.append({"kind": "state", "state": s, "final_test_acc": 50.0, "final_val_acc": 50.0,
                        "best_test_acc": 50.0, "best_val_acc": 50.0, "flops_alive": final, "flops_total": DENSE,
                        "params_alive": 1, "params_total": 1, "time_s": 1.0, "train_flops": spent,
                        "train_time_s": 1.0,
                        **({"ticket_epoch_flops": IMAGES * (3 * final + extra)} if with_ticket else {})})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return report.load_run(run_dir)


E = 30
SHAPES = {  # name: (flags, the loop's states, the epochs of the ticket that cost what it spent after State 0)
    "2-state RSST": ({"states": 2, "epochs": E}, [(E, [(1, DENSE)], DENSE), (E, [(1, DENSE)], TICKET)],
                     E * DENSE / TICKET),
    "2-state RSST, reach 0.5": ({"states": 2, "epochs": E, "reg_reach": 0.5},
                                [(E, [(1, DENSE)], DENSE), (E, [(0.5, DENSE), (0.5, TICKET)], TICKET)],
                                E * (DENSE + TICKET) / 2 / TICKET),
    "geometric RSST, 3 states": ({"states": 3, "epochs": E, "schedule": "geometric"},
                                 [(E, [(1, DENSE)], DENSE), (E, [(1, DENSE)], HALF), (E, [(1, HALF)], TICKET)],
                                 E * (DENSE + HALF) / TICKET),
    "3-state RSST, reach 0.5": ({"states": 3, "epochs": E, "reg_reach": 0.5},
                                [(E, [(1, DENSE)], DENSE), (E, [(0.5, DENSE), (0.5, TICKET)], TICKET),
                                 (E, [(1, TICKET)], TICKET)], E * ((DENSE + TICKET) / 2 + TICKET) / TICKET),
    "3-state RSST, 10 epochs in states >= 1": ({"states": 3, "epochs": E, "pruned_epochs": 10},
                                               [(E, [(1, DENSE)], DENSE), (10, [(1, DENSE)], TICKET),
                                                (10, [(1, TICKET)], TICKET)], 10 * (DENSE + TICKET) / TICKET),
}


@pytest.mark.parametrize("with_ticket", [True, False], ids=["ticket_epoch_flops", "older records"])
@pytest.mark.parametrize("shape", SHAPES)
def test_the_pruned_epochs_of_equal_compute_for_every_loop_shape(tmp_path, shape, with_ticket):
    """What the loop spent after State 0 in epochs of its final ticket, against FLOPs counted by hand;
    records without `ticket_epoch_flops` derive an epoch's images from State 0."""
    flags, states, expected = SHAPES[shape]
    run = loop_run(tmp_path, "run", states, flags, with_ticket)
    assert compute.matching_pruned_epochs(run) == pytest.approx(expected, rel=1e-9)
    assert expected > E  # RSST's targets cost more than the epochs it trained


@pytest.mark.parametrize("with_ticket", [True, False], ids=["ticket_epoch_flops", "older records"])
def test_a_teacher_is_in_the_cost_of_an_epoch(tmp_path, with_ticket):
    """--distill=state0: every step of states >= 1 adds the dense teacher's forward."""
    states = [(E, [(1, DENSE)], DENSE), (E, [(1, DENSE)], TICKET)]
    run = loop_run(tmp_path, "run", states, {"states": 2, "epochs": E, "distill": "state0"}, with_ticket, DENSE)
    assert compute.matching_pruned_epochs(run) == pytest.approx(E * 4 * DENSE / (3 * TICKET + DENSE), rel=1e-9)


def test_the_report_prints_the_suggestion(tmp_path):
    flags, states, expected = SHAPES["2-state RSST"]
    loop_run(tmp_path / "runs", "rsst", states, flags, with_ticket=False)
    out = tmp_path / "r.md"
    report.main(str(tmp_path / "runs" / "rsst"), out=str(out))
    assert f"| `--pruned_epochs={round(expected)}` |" in out.read_text()


# ---- the four ways of retraining, pairwise at equal compute ----------------------------------------

STRATEGIES = {  # label: how its config differs from the ticket loop's (4 states × 2 epochs)
    "refill loop, 4 × 2 epochs": {},
    "refill learning-rate rewinding, 2 + 6 epochs": {"states": 2, "rewind": "none", "pruned_epochs": 6},
    "refill fine-tuning at lr=final, 2 + 6 epochs": {"states": 2, "rewind": "none", "pruned_epochs": 6,
                                                     "retrain_lr": "final"},
    "refill scratch, 2 + 6 epochs": {"states": 2, "rewind": "random", "pruned_epochs": 6},
}
NOISE = {"refill loop, 4 × 2 epochs": [0.0, 0.3, -0.2, 0.1],
         "refill learning-rate rewinding, 2 + 6 epochs": [0.2, -0.1, 0.1, -0.3],
         "refill fine-tuning at lr=final, 2 + 6 epochs": [-0.1, 0.2, 0.3, 0.0],
         "refill scratch, 2 + 6 epochs": [0.1, 0.0, -0.3, 0.2]}
SEED_EFFECT = [-3.0, 0.0, 3.0, 1.5]


def strategy_run(root, label, seed, acc, split=None):
    """A run of one of STRATEGIES: 19 P of training (State 0: 10 P), its best pruned state (by val)
    at `acc`; the raw config.json of a run with those flags; `split`: its split fingerprint."""
    flags = STRATEGIES[label]
    cfg = {**Config(method="refill", dataset="cifar100", seed=seed, epochs=2, states=4).to_dict(), **flags}
    flops = [10, 13, 16, 19] if flags.get("states", 4) == 4 else [10, 19]
    run_dir = root / f"{label.split(',')[0].replace(' ', '_')}_s{seed}"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(cfg))
    (run_dir / "summary.json").write_text(json.dumps({"status": "finished", **({"split_fingerprint": split}
                                                                                if split else {})}))
    records = [{"kind": "state", "state": s, "final_test_acc": 70.0 if s == 0 else acc,
                "final_val_acc": 70.0 if s == 0 else acc, "best_test_acc": acc, "best_val_acc": acc,
                "params_alive": 30, "params_total": 100, "time_s": 1.0, "train_flops": f * P, "train_time_s": 1.0,
                "ticket_epoch_flops": 1.5 * P} for s, f in enumerate(flops)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


def planted(root, gap=2.0, splits=None):
    """4 seeds of each way of retraining at 19 P: all equal (± noise) but scratch, `gap` points below."""
    acc = {label: {seed: 60 + s + NOISE[label][seed] - gap * label.startswith("refill scratch")
                   for seed, s in enumerate(SEED_EFFECT)} for label in STRATEGIES}
    runs = [strategy_run(root, label, seed, a, (splits or {}).get((label, seed), f"{seed:064x}"))
            for label, seeds in acc.items() for seed, a in seeds.items()]
    return runs, acc


def holm(ps: dict) -> dict:
    ordered, out, worst = sorted(ps.items(), key=lambda kv: kv[1]), {}, 0.0
    for k, (key, p) in enumerate(ordered):
        worst = max(worst, min(1.0, (len(ps) - k) * p))
        out[key] = worst
    return out


def test_every_way_of_retraining_against_every_other_holm_corrected_together(tmp_path):
    runs, acc = planted(tmp_path)
    rows = compute.equal_compute_verdicts(compute.equal_compute([report.load_run(r) for r in runs]))
    labels = list(STRATEGIES)
    assert [(row.a, row.b) for row in rows] == [(a, b) for i, a in enumerate(labels) for b in labels[i + 1:]]
    ps = {(row.a, row.b): ttest_rel([acc[row.a][s] for s in range(4)], [acc[row.b][s] for s in range(4)]).pvalue
          for row in rows}
    adjusted = holm(ps)
    for row in rows:
        p = ps[(row.a, row.b)]
        assert row.test.n == 4 and row.ratio == pytest.approx(1.0) and row.test.p == pytest.approx(p)
        if row.b.startswith("refill scratch"):  # planted: scratch 2 points below every other way
            assert row.verdict == f"**{row.a}** (Holm p={adjusted[(row.a, row.b)]:.3f}, p={p:.3f}; paired over 4 seeds)"
        else:  # the null
            assert row.verdict.startswith("within noise") and adjusted[(row.a, row.b)] >= 0.05, row


def test_the_report_shows_every_way_of_retraining(tmp_path, monkeypatch):
    import matplotlib.figure
    drawn, save = {}, matplotlib.figure.Figure.savefig

    def savefig(fig, path, **kwargs):
        drawn.update({c.get_label().split(" (")[0]: (c.lines[0].get_linestyle(), c.lines[0].get_marker())
                      for c in fig.axes[0].containers})
        return save(fig, path, **kwargs)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    runs, _ = planted(tmp_path / "runs")
    out = tmp_path / "r.md"
    report.main(*map(str, runs), out=str(out))
    md = out.read_text()
    assert set(drawn) == set(STRATEGIES) and len(set(drawn.values())) == 4  # each way drawn its own way
    table = [line for line in md.splitlines() if line.startswith("| refill ") and " | 1.00 | 4 (0, 1, 2, 3) |" in line]
    assert len(table) == 6
    assert "**learning-rate rewinding** (`--rewind=none`" in md and "Renda et al. 2020" in md
    assert "Liu et al. 2019" in md
    # each way of retraining is a cell of its own in the method comparison, not a duplicate
    assert "counted once" not in md and md.count("### Cell:") == 4


def test_a_pair_at_equal_compute_whose_splits_differ_is_refused(tmp_path):
    runs, _ = planted(tmp_path, splits={("refill scratch, 2 + 6 epochs", 2): "f" * 64})
    rows = compute.equal_compute([report.load_run(r) for r in runs])
    for row in rows:
        scratch = row.b.startswith("refill scratch")
        assert row.test.n == (3 if scratch else 4)
        assert [(seed, a.name, b.name) for seed, a, b in row.pairing[1]] == (
            [(2, f"{row.a.split(',')[0].replace(' ', '_')}_s2", "refill_scratch_s2")] if scratch else [])
    out = tmp_path / "r.md"
    report.main(*map(str, runs), out=str(out))
    [line] = [x for x in out.read_text().splitlines() if x.startswith("Refused pairs")]
    assert line.count("refill_scratch_s2") == 3 and line.count("(seed 2)") == 3
