"""The equal-compute question: prune-and-fine-tune as a configuration of the loop
(--pruned_epochs), the budget sweeps, and the report's compute figure, "compute to reach this
state" column and equal-compute verdict, on fixture records with planted effects."""
import json
from pathlib import Path

import pytest
import yaml
from scipy.stats import ttest_rel

from vitprune import report
from vitprune.config import Config, from_flags
from vitprune.report import compute, stats
from vitprune.report.identity import strategy

from conftest import run_cli

SWEEPS = Path(__file__).parent.parent / "sweeps"
FIXTURES = Path(__file__).parent / "fixtures" / "report_runs"
P = 1e15  # the fixtures' compute unit


@pytest.fixture(autouse=True)
def no_wandb_online(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")


# ---- the flag ---------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, expect", [
    (["--states=1", "--pruned_epochs=5"], "--pruned_epochs: sets the epochs of states >= 1, and --states=1 has none"),
    (["--rewind=epoch:1", "--epochs=3", "--pruned_epochs=5"],
     "--pruned_epochs: applies only with --rewind=init|none|random, not with --rewind=epoch:1; drop it"),
    (["--pruned_epochs=0"], "--pruned_epochs: 0 is not at least 1"),
])
def test_pruned_epochs_refused_where_it_cannot_apply(tmp_path, monkeypatch, capsys, flags, expect):
    out = tmp_path / "runs"
    assert run_cli(monkeypatch, "run", "--dataset=synthetic", *flags, f"--out_dir={out}", "--wandb=disabled") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --pruned_epochs") and expect in err, err
    assert not out.exists()


def test_the_ways_of_retraining_are_configurations_of_the_loop():
    cfg = from_flags({"method": "refill", "states": 2, "rewind": "none", "pruned_epochs": 900})
    assert strategy(cfg.to_dict()) == "learning-rate rewinding" and cfg.rewind_epoch is None
    assert strategy(Config().to_dict()) == "weight rewinding"
    assert strategy(Config(states=2).to_dict()) == "weight rewinding"  # one round of the lottery ticket
    assert strategy(Config(rewind="epoch:3").to_dict()) == "weight rewinding"
    assert strategy(Config(method="rsst", states=2, rewind="none").to_dict()) == "learning-rate rewinding"
    assert strategy({"rewind": "none", "retrain_lr": "final"}) == "fine-tuning"
    assert strategy({"rewind": "random", "pruned_epochs": 6}) == "scratch"
    assert strategy({"rewind": "none"}) == "learning-rate rewinding"  # records before --retrain_lr


# ---- the paired test --------------------------------------------------------------------------

def test_paired_test_pairs_by_seed_and_matches_scipy():
    a = {2: 61.0, 0: 60.0, 1: 62.5, 7: 99.0}  # seed 7 has no partner: left out
    b = {0: 58.0, 1: 59.0, 2: 60.5, 5: 10.0}
    t = stats.paired_test(a, b)
    ref = ttest_rel([60.0, 62.5, 61.0], [58.0, 59.0, 60.5])
    ci = ref.confidence_interval(0.95)
    assert t.n == 3 and t.delta == pytest.approx((2.0 + 3.5 + 0.5) / 3)
    assert (t.low, t.high, t.p) == (pytest.approx(ci.low), pytest.approx(ci.high), pytest.approx(ref.pvalue))
    assert stats.paired_test(b, a).delta == pytest.approx(-t.delta)  # a − b
    one = stats.paired_test({0: 5.0}, {0: 3.0, 1: 1.0})
    assert (one.delta, one.low, one.high, one.p, one.n) == (2.0, None, None, None, 1)
    flat = stats.paired_test({0: 5.0, 1: 6.0}, {0: 4.0, 1: 5.0})  # every difference 1.0: no spread
    assert (flat.delta, flat.low, flat.high, flat.p, flat.n) == (1.0, 1.0, 1.0, None, 2)
    assert stats.paired_test({}, {0: 1.0}).n == 0


# ---- fixtures: runs whose records carry train_flops --------------------------------------------

def budget_run(root, method, finals, flops, seed, vals=None, epochs=2, **flags):
    """A run folder: final test accuracy and cumulative training FLOPs (in P) per state, val =
    test unless `vals`; train_flops/train_time_s in every epoch and state record (None: left out,
    as in records written before compute accounting)."""
    cfg = Config(method=method, dataset="cifar100", seed=seed, states=len(finals), epochs=epochs, **flags).to_dict()
    run_dir = root / f"{method}_{len(finals)}x{flags.get('pruned_epochs')}_s{seed}"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(cfg))
    vals, records = vals or finals, []
    for s, (acc, f) in enumerate(zip(finals, flops)):
        spent = {} if f is None else {"train_flops": f * P, "train_time_s": 10.0 * (s + 1)}
        # an epoch of State 0's network (dense): 5 P; of every ticket: 1.5 P
        ticket = {} if f is None else {"ticket_epoch_flops": (5.0 if s == 0 else 1.5) * P}
        records.append({"kind": "epoch", "state": s, "epoch": 0, "global_epoch": s, "val_acc": vals[s],
                        "test_acc": acc, "time_s": 1.0, **spent})
        records.append({"kind": "state", "state": s, "final_test_acc": acc, "final_val_acc": vals[s],
                        "best_test_acc": acc, "best_val_acc": vals[s], "params_alive": 100 if s == 0 else 30,
                        "params_total": 100, "time_s": 2.0, **spent, **ticket})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


LR_REWINDING = dict(rewind="none")
REFILL_LOOP = [10, 13, 16, 19]  # state 0 dense: 10; each ticket state: 3
RSST_LOOP = [10, 20, 23, 26]    # state 1 trains its targets too: dense again


def planted(root, shift=2.0):
    """3 seeds of: the refill loop, better than its fine-tune match by `shift` points (+ noise);
    the rsst loop, equal to its match (the null); fine-tunes matched to each loop's compute.
    Returns (run folders, {name: {seed: best pruned test acc}})."""
    runs, acc = [], {k: {} for k in ("refill", "rsst", "ft6", "ft11")}
    for seed, (e, f6, f11) in enumerate([(0.0, 0.1, 0.2), (0.4, -0.2, 0.1), (-0.3, 0.3, -0.4)]):
        # the loops' best state by val is state 2 (its test acc counts); state 3's test acc is higher
        runs.append(budget_run(root, "refill", [70, 55, 60 + shift + e, 66], REFILL_LOOP, seed,
                               vals=[70, 55, 63, 61]))
        runs.append(budget_run(root, "rsst", [70, 55, 60 + e, 66], RSST_LOOP, seed, vals=[70, 55, 63, 61]))
        runs.append(budget_run(root, "refill", [70, 60 + e + f6], [10, 19], seed, pruned_epochs=6, **LR_REWINDING))
        runs.append(budget_run(root, "refill", [70, 60 + e + f11], [10, 26.5], seed, pruned_epochs=11, **LR_REWINDING))
        acc["refill"][seed], acc["rsst"][seed] = 60 + shift + e, 60 + e
        acc["ft6"][seed], acc["ft11"][seed] = 60 + e + f6, 60 + e + f11
    return runs, acc


def holm(ps):
    """Holm's step-down adjusted p-values, written out for two tests."""
    lo, hi = sorted(ps)
    first = min(1.0, 2 * lo)
    return {lo: first, hi: max(first, hi)}


def test_planted_winner_and_null_at_equal_compute(tmp_path):
    runs, acc = planted(tmp_path)
    rows = compute.equal_compute_verdicts(compute.equal_compute([report.load_run(r) for r in runs]))
    by_loop = {row.a: row for row in rows}
    assert len(rows) == 2  # each loop against the learning-rate rewinding of its compute
    refill, rsst = by_loop["refill loop, 4 × 2 epochs"], by_loop["rsst loop, 4 × 2 epochs"]
    # each loop meets the learning-rate rewinding of its own compute: refill 19 vs 19, rsst 26 vs 26.5
    assert refill.b == "refill learning-rate rewinding, 2 + 6 epochs" and refill.ratio == pytest.approx(1.0)
    assert rsst.b == "refill learning-rate rewinding, 2 + 11 epochs" and rsst.ratio == pytest.approx(26.5 / 26)
    assert refill.a_acc == acc["refill"] and refill.b_acc == acc["ft6"]  # state 2: best by val
    p_refill = ttest_rel([acc["refill"][s] for s in range(3)], [acc["ft6"][s] for s in range(3)]).pvalue
    p_rsst = ttest_rel([acc["rsst"][s] for s in range(3)], [acc["ft11"][s] for s in range(3)]).pvalue
    adjusted = holm([p_refill, p_rsst])
    assert refill.test.p == pytest.approx(p_refill) and refill.test.n == 3
    assert refill.verdict == (f"**refill loop, 4 × 2 epochs** (Holm p={adjusted[p_refill]:.3f}, p={p_refill:.3f}; "
                              f"paired over 3 seeds)")
    assert adjusted[p_refill] < 0.05 < adjusted[p_rsst] and p_rsst > 0.05
    assert rsst.verdict == f"within noise (Holm p={adjusted[p_rsst]:.2f}, p={p_rsst:.2f}; paired over 3 seeds)"


def test_fine_tune_wins_when_the_loop_is_worse(tmp_path):
    runs, _ = planted(tmp_path, shift=-2.0)
    rows = compute.equal_compute_verdicts(compute.equal_compute([report.load_run(r) for r in runs]))
    refill = next(r for r in rows if r.a.startswith("refill"))
    assert refill.test.delta < 0 and refill.verdict.startswith("**refill learning-rate rewinding, 2 + 6 epochs** (Holm")


@pytest.mark.parametrize("ft_flops, seeds", [(19 * 1.09, 3), (19 * 1.11, 0), (19 * 0.91, 3), (19 * 0.89, 0)])
def test_equal_compute_is_within_ten_percent(tmp_path, ft_flops, seeds):
    runs = []
    for seed, e in enumerate([0.0, 0.5, -0.5]):
        runs.append(budget_run(tmp_path, "refill", [70, 60, 62 + e, 61], REFILL_LOOP, seed))
        runs.append(budget_run(tmp_path, "refill", [70, 60 - e], [10, ft_flops], seed, pruned_epochs=6, **LR_REWINDING))
    (row,) = compute.equal_compute_verdicts(compute.equal_compute([report.load_run(r) for r in runs]))
    assert row.test.n == seeds and row.ratio == pytest.approx(ft_flops / 19)
    if not seeds:
        assert row.verdict == f"no verdict: no seed whose two runs' compute lie within ±10% (B / A = {ft_flops / 19:.2f})"


def test_one_seed_gives_no_verdict(tmp_path):
    runs = [budget_run(tmp_path, "refill", [70, 60, 62, 61], REFILL_LOOP, 0),
            budget_run(tmp_path, "refill", [70, 58], [10, 19], 0, pruned_epochs=6, **LR_REWINDING)]
    (row,) = compute.equal_compute_verdicts(compute.equal_compute([report.load_run(r) for r in runs]))
    assert row.test.delta == pytest.approx(4.0) and row.verdict == "no verdict: one seed at equal compute (run several seeds)"


def test_report_shows_the_compute_figure_column_and_verdict(tmp_path, monkeypatch):
    import matplotlib.figure
    plotted, save = {}, matplotlib.figure.Figure.savefig

    def savefig(fig, path, **kwargs):  # what each figure draws
        plotted[Path(path).name] = {c.get_label(): list(c.lines[0].get_xdata()) for c in fig.axes[0].containers}
        return save(fig, path, **kwargs)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    runs, acc = planted(tmp_path / "runs")
    out = tmp_path / "report" / "budget.md"
    report.main(*map(str, runs), out=str(out))
    md = out.read_text()
    assert "## Compute: accuracy vs training compute" in md and "### cifar100, vit_small, ratio=0.7" in md
    assert "![test accuracy vs cumulative training compute](budget_compute.png)" in md
    assert (out.parent / "budget_compute.png").stat().st_size > 1000
    curves = {label.split(" (")[0]: x for label, x in plotted["budget_compute.png"].items()}
    assert curves["refill loop, 4 × 2 epochs"] == [f * P for f in REFILL_LOOP]  # state points at cumulative FLOPs
    assert curves["rsst loop, 4 × 2 epochs"] == [f * P for f in RSST_LOOP]
    assert curves["refill learning-rate rewinding, 2 + 11 epochs"] == [10 * P, 26.5 * P]
    # the 2-state retraining each loop needs: what it spent after State 0 in epochs of its ticket (1.5 P each)
    assert "| refill loop, 4 × 2 epochs | 3 | 19 PFLOP | 40.0 s | 62.03% ± 0.35 (3 seeds) | `--pruned_epochs=6` |" in md
    assert "| rsst loop, 4 × 2 epochs | 3 | 26 PFLOP | 40.0 s | 60.03% ± 0.35 (3 seeds) | `--pruned_epochs=11` |" in md
    assert ("| refill learning-rate rewinding, 2 + 6 epochs | 3 | 19 PFLOP | 20.0 s | 60.10% ± 0.10 (3 seeds) | "
            "`--pruned_epochs=6` |") in md  # itself
    p = ttest_rel([acc["refill"][s] for s in range(3)], [acc["ft6"][s] for s in range(3)])
    ci = p.confidence_interval(0.95)
    assert (f"| refill loop, 4 × 2 epochs | refill learning-rate rewinding, 2 + 6 epochs | 1.00 | 3 (0, 1, 2) | "
            f"62.03% ± 0.35 (3 seeds) | 60.10% ± 0.10 (3 seeds) | +1.93 [{ci.low:+.2f}, {ci.high:+.2f}] | "
            f"**refill loop, 4 × 2 epochs** (Holm p=") in md
    assert "| Δ A − B [95% CI, unadjusted] | Winner at equal compute |" in md
    assert "whose training FLOPs differ by at most 10%" in md  # the definition of equal compute, stated
    # the comparison tables: compute to reach each state, per configuration in the columns' order
    # (the loops and each learning-rate rewinding are cells of their own there: they differ in more than method;
    # Holm over 2 tests: the two equal-compute verdicts, State 1 having no seed variance)
    assert "| Winner (paired; Holm over 2 tests) | Compute to reach this state |" in md
    assert "| State 0 (dense) |" in md and "| 10 PFLOP / 10 PFLOP |" in md
    assert "| State 1 (the methods' tickets) | 55.00% ± 0.00 (3 seeds) | 55.00% ± 0.00 (3 seeds) | +0.00 " \
        "| n/a (no seed variance) | 13 PFLOP / 20 PFLOP |" in md
    assert "| State 1 (the methods' tickets) | 60.10% ± 0.10 (3 seeds) | 19 PFLOP |" in md  # the 2-state runs
    assert "| State 1 (the methods' tickets) | 60.00% ± 0.62 (3 seeds) | 26.5 PFLOP |" in md
    assert "| Mean, states 2+ (none) | n/a | n/a |" in md  # a 2-state run has no state 2: nothing reached


def test_old_records_get_no_compute_figure_and_say_why(tmp_path):
    out = tmp_path / "r.md"
    report.main(str(FIXTURES / "cifar10_refill_vit_small_r0.7_s0"), str(FIXTURES / "cifar10_rsst_vit_small_r0.7_s0"),
                out=str(out))
    md = out.read_text()
    assert ("No compute figure and no equal-compute verdict: no run has `train_flops` in its records "
            "(written before compute accounting).") in md
    assert "Compute to reach this state" not in md and not list(tmp_path.glob("*compute*.png"))
    # a cell with one old run: the others are compared, the old one is named
    runs, _ = planted(tmp_path / "runs")
    old = budget_run(tmp_path / "old", "refill", [70, 60, 61, 62], [None] * 4, 5)
    report.main(*map(str, runs), str(old), out=str(out))
    md = out.read_text()
    assert f"No compute figure or verdict for {old.name}: no `train_flops` in their records" in md
    assert "**refill loop, 4 × 2 epochs** (Holm p=" in md
    loops = md.split("### Final pruned test accuracy (headline) — pruned_epochs=None")[1].split("\n\n")[1]
    assert "Compute to reach this state" not in loops  # the loops' cell mixes runs with and without


# ---- the sweeps -------------------------------------------------------------------------------

def points(name):
    from vitprune import sweep
    return [from_flags(p) for p in sweep.grid(yaml.safe_load((SWEEPS / name).read_text()))]


# How a run retrains its ticket: the loop's shape, the rewind point and the learning rate. The budget
# sweeps' runs agree on every other flag (one cell: the same data, model, ratio and recipe).
STRATEGY = ("method", "states", "epochs", "pruned_epochs", "rewind", "retrain_lr", "seed", "name")


def sweep_strategy(c) -> str:
    """The retraining strategy a budget sweep's point runs (docs/method.md's table)."""
    if c.states > 2:
        return f"{c.method} loop"  # weight rewinding, state after state
    if c.rewind == "none":
        return "learning-rate rewinding" if c.retrain_lr is None else "fine-tuning"
    return {"random": "Scratch-B", "init": "weight rewinding"}[c.rewind]


@pytest.mark.parametrize("suffix", ["", "_cpu"])
def test_budget_sweeps_match_the_loops_compute(suffix):
    """The budget sweeps hold the ticket loops (Refill and RSST, weight rewinding) and the three
    retrainings of one pruned State 0: learning-rate rewinding, fine-tuning at State 0's last rate
    and Scratch-B, over the same seeds and otherwise the same flags. Every retraining meets each
    loop at its compute within 2% (from the models' FLOPs), and only one of its P within the
    report's 10%."""
    import torch
    from vitprune.model import build_model
    from vitprune.structure import Structure, count, dims
    loop = points(f"budget{suffix}.yaml")
    retrain = points(f"budget_retrain{suffix}.yaml") + points(f"budget_finetune{suffix}.yaml")
    assert {sweep_strategy(c) for c in loop} == {"refill loop", "rsst loop"} and all(c.rewind == "init" for c in loop)
    assert {sweep_strategy(c) for c in retrain} == {"learning-rate rewinding", "fine-tuning", "Scratch-B"}
    assert all(c.method == "refill" and c.states == 2 for c in retrain)  # prune once, retrain once
    assert {c.retrain_lr for c in retrain if sweep_strategy(c) == "fine-tuning"} == {"final"}
    rest = lambda c: {k: v for k, v in c.to_dict().items() if k not in STRATEGY}
    assert all(rest(c) == rest(loop[0]) for c in loop + retrain)
    seeds = {c.seed for c in loop}
    assert len(seeds) >= 2 and all({c.seed for c in retrain if sweep_strategy(c) == s} == seeds
                                   for s in ("learning-rate rewinding", "fine-tuning", "Scratch-B"))
    c = loop[0]
    model = build_model(c.model, 100 if c.dataset == "cifar100" else 10, c.img_size, c.patch_size)
    L, H, _, _, M = dims(model)
    keep = Structure(torch.arange(L * H).view(L, H) < round((1 - c.ratio) * L * H),
                     torch.arange(L * M).view(L, M) < round((1 - c.ratio) * L * M))
    dense = count(model, keep)["flops_total"]
    ticket = count(model, keep)["flops_alive"]
    for c in loop:  # FLOPs per image and epoch; state 0 dense; RSST's state 1 trains its targets too
        cost = c.epochs * dense + (c.states - 1) * c.epochs * ticket + (c.method == "rsst") * c.epochs * (dense - ticket)
        for s in ("learning-rate rewinding", "fine-tuning", "Scratch-B"):
            ratios = sorted({(f.epochs * dense + f.pruned_epochs * ticket) / cost for f in retrain if sweep_strategy(f) == s})
            assert sum(abs(r - 1) <= compute.EQUAL_COMPUTE for r in ratios) == 1, (c.method, s, ratios)
            assert min(abs(r - 1) for r in ratios) < 0.02, (c.method, s, ratios)


# ---- real runs ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_budget_cpu_sweeps_end_to_end(tmp_path, monkeypatch):
    """sweeps/budget_cpu.yaml, budget_retrain_cpu.yaml and budget_finetune_cpu.yaml: every grid
    point's command runs through the CLI (in this process, on a small split of the synthetic set,
    W&B off) and finishes with its compute recorded; each strategy retrains as intended, from the
    same State 0 and splits as the loops of its seed."""
    import torch
    from conftest import small_data
    from vitprune import runtime, sweep
    from vitprune.runfolder import saved_config
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setattr(runtime, "load_data", small_data((256, 64, 64)))  # 2 steps of the YAML's batch of 128
    monkeypatch.setattr(sweep.subprocess, "run", lambda command: type("Done", (), {
        "returncode": run_cli(monkeypatch, *command[command.index("run"):])}))
    for part in ("", "_retrain", "_finetune"):
        sweep.main(str(SWEEPS / f"budget{part}_cpu.yaml"), out_dir=str(tmp_path / "runs" / (part or "_loop")))
    runs = {d: (Config(**saved_config(d)), json.loads((d / "summary.json").read_text()),
                [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()])
            for d in sorted((tmp_path / "runs").glob("*/*"))}
    assert len(runs) == 4 + 8 + 4 and all(summary["status"] == "finished" for _, summary, _ in runs.values())
    by = {(sweep_strategy(c), c.seed, c.pruned_epochs): (d, summary, rs) for d, (c, summary, rs) in runs.items()}
    for (name, seed, p), (d, summary, rs) in by.items():
        states = [r for r in rs if r["kind"] == "state"]
        assert all(r["train_flops"] > 0 and r["ticket_epoch_flops"] > 0 for r in states)
        loop = by[("refill loop", seed, None)][1]  # the same State 0 and splits as the loops of the seed
        assert (summary["state0_fingerprint"], summary["split_fingerprint"]) == \
            (loop["state0_fingerprint"], loop["split_fingerprint"])
        if name.endswith("loop"):
            continue
        later = [r["lr"] for r in rs if r["kind"] == "epoch" and r["state"] == 1]
        assert len(later) == p and states[1]["train_flops"] - states[0]["train_flops"] == p * states[1]["ticket_epoch_flops"]
        # fine-tuning at State 0's last rate (one epoch, before multistep's drop: --lr); the others replay the schedule
        replayed = [0.001 * 0.1 ** ((e >= p / 2) + (e >= 0.75 * p)) for e in range(p)]  # multistep over P epochs
        assert later == pytest.approx([0.001] * p if name == "fine-tuning" else replayed), name
        start = torch.load(d / "checkpoints" / "start_01.pt", weights_only=True)["model"]["blocks.0.mlp.fc1.weight"]
        trained = torch.load(d / "checkpoints" / "state_00.pt", weights_only=True)["model"]["blocks.0.mlp.fc1.weight"]
        kept = start != 0
        assert torch.equal(start[kept], trained[kept]) == (name != "Scratch-B")  # Scratch-B: a fresh init
    # The report of all sixteen runs: every configuration of every strategy drawn in the compute
    # figure, and every verdict's p-value Holm-adjusted within one family (the equal-compute pairs
    # and the loops' State 1 test together), recomputed here from the records.
    import re

    import matplotlib.figure
    drawn, save = {}, matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, path, **kw: (
        drawn.__setitem__(Path(path).name, [c.get_label().split(" (")[0] for c in fig.axes[0].containers]),
        save(fig, path, **kw))[1])
    out = tmp_path / "report" / "budget.md"
    report.main(*map(str, runs), out=str(out))
    md = out.read_text()

    def label(c):  # the configuration's name in the report
        if c.states > 2:
            return f"{c.method} loop, {c.states} × {c.epochs} epochs"
        kind = {"learning-rate rewinding": "learning-rate rewinding", "fine-tuning": "fine-tuning at lr=final",
                "Scratch-B": "scratch"}[sweep_strategy(c)]
        return f"{c.method} {kind}, {c.epochs} + {c.pruned_epochs} epochs"
    best = {}  # (configuration, seed) -> test accuracy of the run's best pruned state by val
    for c, _, rs in runs.values():
        pruned = [r for r in rs if r["kind"] == "state" and r["state"] >= 1]
        best[label(c), c.seed] = max(pruned, key=lambda r: r["final_val_acc"])["final_test_acc"]
    configurations = {name for name, _ in best}
    assert len(configurations) == 8
    (curves,) = [v for k, v in drawn.items() if k.endswith("_compute.png")]
    assert sorted(curves) == sorted(configurations)  # the loops and all three retrainings, twice each

    tests = {}  # verdict cell -> raw p
    section = md.split("## Compute: accuracy vs training compute")[1]
    for row in section.splitlines():
        cells = row.split(" | ")
        if len(cells) == 8 and cells[1] in configurations and "Holm p=" in cells[-1]:
            a, b, seeds = cells[0].lstrip("| "), cells[1], [int(s) for s in re.findall(r"\d+", cells[3].split("(")[1])]
            tests[row] = ttest_rel([best[a, s] for s in seeds], [best[b, s] for s in seeds]).pvalue
    state1 = {(c.method, c.seed): next(r["final_test_acc"] for r in rs if r["kind"] == "state" and r["state"] == 1)
              for c, _, rs in runs.values() if c.states > 2}
    loops = md.split("### State by state (final pruned test accuracy) — pruned_epochs=None")[1].split("\n\n")[1]
    row = next(r for r in loops.splitlines() if r.startswith("| 1 |"))
    p = ttest_rel([state1["rsst", s] for s in (0, 1)], [state1["refill", s] for s in (0, 1)]).pvalue
    if p == p:  # a constant difference has no test (and is no member of the family)
        tests[row] = p
    assert len(tests) >= 12 and f"Holm over {len(tests)} tests" in md
    order = sorted(tests, key=tests.get)
    adjusted, running = {}, 0.0
    for i, key in enumerate(order):  # Holm's step-down: the i-th smallest times (m - i), kept monotone
        running = max(running, min(1.0, (len(order) - i) * tests[key]))
        adjusted[key] = running
    for row, p_holm in adjusted.items():
        printed = float(re.search(r"Holm p=([\d.]+)", row).group(1))
        assert printed == pytest.approx(p_holm, abs=0.0051), row
