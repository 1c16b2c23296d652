"""Report numbers against hand-computed values from tests/fixtures/report_runs (refill: 6 states,
rsst: 5 states, so 5 common states 0-4), the noise rules, W&B sources with mocks."""
import json
import shutil
from pathlib import Path

import pytest
from scipy.stats import norm, t as t_dist, ttest_1samp

from vitprune import report
from vitprune.config import Config
from vitprune.errors import ConfigError
from vitprune.log import wandb_names, read_metrics

FIXTURES = Path(__file__).parent / "fixtures" / "report_runs"
REFILL, RSST = FIXTURES / "cifar10_refill_vit_small_r0.7_s0", FIXTURES / "cifar10_rsst_vit_small_r0.7_s0"


@pytest.fixture(autouse=True)
def no_wandb_online(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")


def test_run_stats_by_hand():
    # refill over the common states 0-4: final test 80, 79, 82, 83, 82; final val 79.5, 78.5, 81.5, 82.5, 81.5
    s = report.run_stats(report.load_run(REFILL), n=5)
    assert s["state0"] == 80.0 and s["state1"] == 79.0
    assert (s["best"], s["best_state"]) == (83.0, 3)  # state 3 has the best val (82.5): its test acc
    assert s["mean"] == pytest.approx((82 + 83 + 82) / 3)
    assert s["std"] == pytest.approx((((82 - 82.3333) ** 2 * 2 + (83 - 82.3333) ** 2) / 2) ** 0.5, abs=1e-4)
    assert s["retention"] == pytest.approx(100 * 83 / 80)
    assert s["late"] == pytest.approx((83 + 82) / 2)  # last third of 5 states = states 3-4
    assert s["last"] == 82.0


def test_oneshot_compares_state_1_only():
    runs = [report.load_run(REFILL), report.load_run(RSST)]
    [cell] = report.cells(runs)
    assert sorted(cell.groups) == ["refill", "rsst"]  # RSST-only flags do not label the columns
    assert cell.pairs() == [("refill", "rsst")] and cell.n == 5
    verdicts = report.Verdicts([cell])
    table = report.cell_tables(cell, verdicts)
    rows = {metric: (cells, pairs) for metric, _, cells, pairs in report.comparison(table)}
    noise = 2 ** 0.5 * (1 / 3) ** 0.5  # √2 × refill's std over states 2-4 (rsst's is 0.29)
    p = 2 * norm.sf(1.0 / noise)  # the one test: its Holm p is its p
    cells, [(delta, verdict)] = rows["state1"]  # 79.0 vs 80.0: z = 1.22
    assert cells == {"refill": "79.00%", "rsst": "80.00% ⚠"}  # rsst's state 1 kept 35% of its targets
    assert delta == "+1.00" and verdict == f"within noise (z = 1.22 against √2σ = {noise:.2f}; Holm p={p:.2f}, " \
                                           f"p={p:.2f}; one seed)"
    for metric in ("best", "mean", "late", "last", "retention"):  # states >= 2: the same ticket, retrained
        assert rows[metric][1][0][0] == "n/a" and "same ticket, retrained" in rows[metric][1][0][1], metric
    assert rows["state0"][1][0][1].startswith("– (dense")
    assert rows["best"][0] == {"refill": "83.00% (state 3)", "rsst": "80.50% (state 3)"}
    assert len(verdicts) == 1  # one seed: its test against the within-run noise joins Holm


def test_markdown_and_plots(tmp_path, capsys, monkeypatch):
    import matplotlib.figure
    ticks, save = [], matplotlib.figure.Figure.savefig

    def savefig(fig, path, **kwargs):  # what the plots show on their x axes
        ax = fig.axes[0]
        ticks.append([t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]])
        return save(fig, path, **kwargs)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    short = [write_run(tmp_path, m, [50.0, 45.0]) for m in ("refill", "rsst")]  # two states: 0 and 1 only
    report.main(*map(str, short), out=str(tmp_path / "short.md"))
    out = tmp_path / "sub" / "report.md"
    report.main(str(REFILL), str(RSST), out=str(out))
    md = out.read_text()
    assert len(ticks) == 4 and all(t == int(t) for axis in ticks for t in axis)  # states and epochs: integers
    assert "| Metric | refill | rsst | Δ rsst − refill [95% CI, unadjusted] | Winner (paired; Holm over 1 tests) |" in md
    assert "**final pruned test accuracy**" in md and "### Best-epoch test accuracy" in md
    assert "cifar10_refill_vit_small_r0.7_s0: 6, cifar10_rsst_vit_small_r0.7_s0: 5" in md
    assert "| Metric | refill | rsst |\n" in md  # the best-epoch table describes: no verdict
    assert "Only **State 1** can tell the methods apart" in md
    assert ("**Key result** (final pruned test accuracy at State 1): refill 79.00% vs rsst 80.00% ⚠; "
            "Δ rsst − refill = +1.00 → within noise (z = 1.22 against √2σ = 0.82; Holm p=0.22, p=0.22; one seed).") in md
    assert "| Mean, states 2–4 | 82.33% | 80.17% | n/a | – (same ticket, retrained) |" in md
    assert "| 3 | 83.00% | 80.50% | n/a | – (same ticket, retrained) |" in md  # state by state
    assert "⚠ = RSST targets not driven to zero at the hard prune" in md
    assert "| targets' norm at hard prune (RSST) |  | 0.350 ⚠ | 0.010 | 0.010 | 0.010 |" in md
    # findings: state 0 val 50,60,70,78 -> first-2 55, last-2 74; rsst plateaued (+0.15)
    assert "| cifar10_refill_vit_small_r0.7_s0 | 55.00% | 74.00% | +19.00 | still rising" in md
    assert "| cifar10_rsst_vit_small_r0.7_s0 | 75.90% | 76.05% | +0.15 | plateaued" in md
    # recovery: state 0 final 80 -> state 1 start 10, epoch 0 30 -> state 1 final 79
    assert "| cifar10_refill_vit_small_r0.7_s0 | 80.00% | 10.00% | 30.00% | -50.00 | 79.00% | -1.00 |" in md
    assert "| Total parameters | 1.00M | 400.0K (2.50×) | 400.0K (2.50×) |" in md
    assert "| Attention parameters | 300.0K | 90.0K (3.33×) |" in md
    assert "| cifar10_refill_vit_small_r0.7_s0 | 100.0 s | 3.3 min | 3.5 min | 19.0 min | 50.0 s |" in md
    assert "| before hard prune (RSST) |  | 81.00 | 81.50 | 81.50 | 81.00 |" in md
    for png in ("report_cifar10_states.png", "report_cifar10_epochs.png"):
        assert f"]({png})" in md and (out.parent / png).stat().st_size > 1000


def write_run(root, method, finals, seed=0, dataset="cifar100", epochs=2, vals=None, ratios=None, extra=None,
              name=None, **flags):
    """A run folder with the given final test accuracies per state (val = test unless `vals`;
    `ratios`: RSST target_norm_ratio per state; `extra`: more fields per state record)."""
    flags.setdefault("states", len(finals))
    cfg = Config(method=method, dataset=dataset, seed=seed, epochs=epochs, **flags).to_dict()
    run_dir = root / (name or f"{dataset}_{method}_{flags.get('schedule', 'oneshot')}_s{seed}")
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(cfg))
    vals = vals or finals
    records = []
    for s, acc in enumerate(finals):
        records += [{"kind": "epoch", "state": s, "epoch": e, "global_epoch": s * epochs + e, "val_acc": vals[s],
                     "test_acc": acc, "time_s": 1.0} for e in range(epochs)]
        records.append({"kind": "state", "state": s, "final_test_acc": acc, "final_val_acc": vals[s],
                        "best_test_acc": acc + 0.1, "best_val_acc": vals[s] + 0.1,
                        "params_alive": 100 if s == 0 else 30, "params_total": 100, "time_s": 2.0,
                        **({"target_norm_ratio": ratios[s]} if ratios and s else {}), **(extra[s] if extra else {})})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


def test_best_state_is_chosen_by_val_not_test(tmp_path):
    # state 3 has the best test accuracy (70) but state 2 the best val (66): state 2 is reported
    run_dir = write_run(tmp_path, "refill", [50, 40, 60, 70, 55], vals=[50, 41, 66, 62, 58])
    s = report.run_stats(report.load_run(run_dir))
    assert (s["best_state"], s["best"]) == (2, 60) and s["retention"] == pytest.approx(120.0)
    report.main(str(run_dir), out=str(tmp_path / "r.md"))
    md = (tmp_path / "r.md").read_text()
    assert "| Best pruned state (by val) | 60.00% (state 2) |" in md
    assert "**Key result**: no Refill/RSST pair to compare (refill)." in md


def test_paired_with_several_seeds(tmp_path):
    # state 1: refill 40.0, 40.5, 39.5; rsst 45.0, 45.5, 46.0 (clear); dense 40.25, 41.25, 39.5 (a reference)
    runs = [write_run(tmp_path, "refill", [50, 40 + d, 60, 61], seed) for seed, d in enumerate([0, 0.5, -0.5])]
    runs += [write_run(tmp_path, "rsst", [50, 45 + d, 55, 55], seed, ratios=[None, 0.01, 0.01, 0.01])
             for seed, d in enumerate([0, 0.5, 1.0])]
    runs += [write_run(tmp_path, "dense", [50, 40.25 + d, 60, 60.5], seed) for seed, d in enumerate([0, 1.0, -0.75])]
    [cell] = report.cells([report.load_run(r) for r in runs])
    assert sorted(cell.groups) == ["dense", "refill", "rsst"] and all(len(g) == 3 for g in cell.groups.values())
    assert cell.pairs() == [("refill", "rsst")]  # dense is a reference column, not a contestant
    t = report.paired_test({0: 45.0, 1: 45.5, 2: 46.0}, {0: 40.0, 1: 40.5, 2: 39.5})
    diffs = [5.0, 5.0, 6.5]
    half = t_dist.ppf(0.975, 2) * (sum((d - 5.5) ** 2 for d in diffs) / 2) ** 0.5 / 3 ** 0.5
    assert (t.delta, t.n) == (pytest.approx(5.5), 3) and (t.low, t.high) == (pytest.approx(5.5 - half),
                                                                               pytest.approx(5.5 + half))
    p = ttest_1samp(diffs, 0).pvalue
    assert t.p == pytest.approx(p)
    assert report.paired_test({0: 1.0, 1: 2.0}, {1: 1.5, 2: 0.0}) == (0.5, None, None, None, 1)  # seed 1 only
    md_path = tmp_path / "r.md"
    report.main(*map(str, runs), out=str(md_path))
    md = md_path.read_text()
    assert "Holm-corrected over the 1 tests of this report" in md  # one pair, one state (oneshot)
    assert (f"| State 1 (the methods' tickets) | 40.00% ± 0.50 (3 seeds) | 45.50% ± 0.50 (3 seeds) | "
            f"40.33% ± 0.88 (3 seeds) | +5.50 [{5.5 - half:+.2f}, {5.5 + half:+.2f}] | "
            f"**rsst** (Holm p={p:.3f}, p={p:.3f}; paired over 3 seeds) |") in md
    assert "| Mean, states 2–3 | 60.50% ± 0.00 (3 seeds) |" in md and "– (same ticket, retrained)" in md


def test_geometric_compares_state_by_state_over_seeds(tmp_path):
    one_seed = [write_run(tmp_path / "a", m, [50, 45, 40 + 5 * (m == "rsst"), 30], schedule="geometric")
                for m in ("refill", "rsst")]
    report.main(*map(str, one_seed), out=str(tmp_path / "a.md"))
    md = (tmp_path / "a.md").read_text()
    assert "Schedule **geometric**" in md and "no within-run noise estimate" in md
    assert "| Std over states 2–3 |" in md and "– (states differ in sparsity: not noise)" in md
    assert "no verdict: one seed, and no within-run noise under geometric (run several seeds)" in md
    assert "within noise" not in md  # the spread over states of different sparsity is not noise
    noise = {"refill": [0, 0.4, -0.3], "rsst": [0.2, 0.3, -0.4]}
    seeds = [write_run(tmp_path / "b", m, [50, 45, 40 + 5 * (m == "rsst") + d, 30 + d], seed, schedule="geometric")
             for m in ("refill", "rsst") for seed, d in enumerate(noise[m])]
    report.main(*map(str, seeds), out=str(tmp_path / "b.md"))
    md = (tmp_path / "b.md").read_text()
    diffs = [5 + b - a for a, b in zip(noise["refill"], noise["rsst"])]
    p = ttest_1samp(diffs, 0).pvalue
    p3 = ttest_1samp([b - a for a, b in zip(noise["refill"], noise["rsst"])], 0).pvalue
    tests = {2: p, 3: p3}  # state 1: equal everywhere (no seed variance, no test)
    assert "Holm-corrected over the 2 tests" in md
    assert "| 2 | 40.03% ± 0.35 (3 seeds) | 45.03% ± 0.38 (3 seeds) | +5.00 [" in md
    assert f"**rsst** (Holm p={holm_by_hand(tests)[2]:.3f}, p={p:.3f}; paired over 3 seeds) |" in md
    assert "| 1 | 45.00% ± 0.00 (3 seeds) | 45.00% ± 0.00 (3 seeds) | +0.00 | n/a (no seed variance) |" in md


def holm_by_hand(ps: dict) -> dict:
    """Holm's adjusted p-values, written out: the k-th smallest times (m - k + 1), kept monotone."""
    ordered = sorted(ps.items(), key=lambda kv: kv[1])
    out, worst = {}, 0
    for k, (key, p) in enumerate(ordered):
        worst = max(worst, min(1, (len(ps) - k) * p))
        out[key] = worst
    return out


def test_short_runs_give_na(tmp_path):
    one = write_run(tmp_path, "refill", [50.0], states=2)  # still running its state 1
    two = write_run(tmp_path, "rsst", [50.0, 45.0])
    report.main(str(one), str(two), out=str(tmp_path / "r.md"))
    md = (tmp_path / "r.md").read_text()
    # one common state: nothing pruned to compare; rsst's state 1 still shows in its own series
    assert "**Key result**: no pruned state in common yet: nothing to compare." in md
    assert "| Mean, states 2+ (none) | n/a | n/a | n/a | – (same ticket, retrained) |" in md
    assert "| final test (pruned) | 50.00 | 45.00 |" in md
    assert report.decide(report.paired_test({0: 1.0}, {0: 0.5}), None, {"a": None, "b": 0.1}, "oneshot", "a", "b", 0) \
        == "no verdict: one seed, and within-run noise needs >= 4 states"


def test_bad_input_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="not a run folder"):
        report.main(str(tmp_path), out=str(tmp_path / "r.md"))
    with pytest.raises(ConfigError, match="no run with a finished state"):
        report.main(out=str(tmp_path / "r.md"))
    with pytest.raises(ConfigError, match="--wandb_report: expected ENTITY/PROJECT"):
        report.main(str(REFILL), out=str(tmp_path / "r.md"), wandb_report="justaproject")


def test_wandb_report_offline_still_writes_markdown(tmp_path, capsys):
    report.main(str(REFILL), str(RSST), out=str(tmp_path / "r.md"), wandb_report="me/vitprune")
    assert "cannot create a W&B Report offline" in capsys.readouterr().out
    assert (tmp_path / "r.md").exists()


class FakeWandbRun:
    """What wandb.Api().runs() yields, with the history RunLog would have logged."""

    def __init__(self, run_dir):
        self.name = run_dir.name
        self.config = {**json.loads((run_dir / "config.json").read_text()), "_wandb": {"x": 1}}
        summary = json.loads((run_dir / "summary.json").read_text())
        self.state = summary["status"]
        self.summary_metrics = {k: v for k, v in summary.items() if k not in ("config", "last_state")}
        self.rows = [{**wandb_names(r), "_step": i, "_runtime": 1.0} for i, r in enumerate(read_metrics(run_dir))]

    def scan_history(self):
        return iter(self.rows)


def test_report_from_wandb_project_equals_report_from_folders(tmp_path, monkeypatch, capsys):
    import wandb
    wr = pytest.importorskip("wandb_workspaces.reports.v2")  # the `report` extra
    monkeypatch.setenv("WANDB_MODE", "online")
    asked = []
    monkeypatch.setattr(wandb, "Api", lambda: type("Api", (), {
        "runs": lambda self, path: asked.append(path) or [FakeWandbRun(REFILL), FakeWandbRun(RSST)]})())
    saved = []
    monkeypatch.setattr(wr.Report, "save", lambda self, **kw: saved.append(self))
    monkeypatch.setattr(wr.Report, "url", property(lambda self: "https://wandb.example/report"))
    report.main(out=str(tmp_path / "w" / "r.md"), wandb_project="vitprune", wandb_entity="me",
                wandb_report="me/vitprune")
    report.main(str(REFILL), str(RSST), out=str(tmp_path / "f" / "r.md"))
    assert asked == ["me/vitprune"]
    assert (tmp_path / "w" / "r.md").read_text() == (tmp_path / "f" / "r.md").read_text()
    assert len(saved) == 1 and "https://wandb.example/report" in capsys.readouterr().out
    panels = [b for b in saved[0].blocks if isinstance(b, wr.PanelGrid)]
    assert panels[0].runsets[0].groupby == ["group"]
    assert {tuple(p.y) for p in panels[0].panels} >= {("state/final_test_acc",), ("val_acc",)}


def test_wandb_report_sections_of_several_schedules_filter_by_both(tmp_path, monkeypatch):
    """A dataset with a oneshot and a geometric section: each section's runset selects its runs by
    dataset and schedule (not by the section's title, which no run has as its dataset)."""
    wr = pytest.importorskip("wandb_workspaces.reports.v2")
    from wandb_workspaces.expr import expr_to_filters
    monkeypatch.setenv("WANDB_MODE", "online")
    saved = []
    monkeypatch.setattr(wr.Report, "save", lambda self, **kw: saved.append(self))
    monkeypatch.setattr(wr.Report, "url", property(lambda self: "https://wandb.example/report"))
    runs = [write_run(tmp_path, m, [70, 60, 55], schedule=schedule, name=f"{m}_{schedule}")
            for m in ("refill", "rsst") for schedule in ("oneshot", "geometric")]
    report.main(*map(str, runs), out=str(tmp_path / "r.md"), wandb_report="me/vitprune")
    grids = [b for b in saved[0].blocks if isinstance(b, wr.PanelGrid)]
    found = {}
    for grid in grids:
        filters = expr_to_filters(grid.runsets[0].filters) if isinstance(grid.runsets[0].filters, str) \
            else grid.runsets[0].filters
        found[grid.runsets[0].name] = {f.key.name: f.value for f in filters.filters or [filters]}
    assert found == {"cifar100 — oneshot": {"dataset": "cifar100", "schedule": "oneshot"},
                     "cifar100 — geometric": {"dataset": "cifar100", "schedule": "geometric"}}


def test_resumed_records_count_once(tmp_path):
    run_dir = tmp_path / "r"
    shutil.copytree(REFILL, run_dir)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("\n".join(lines + lines[:5]) + "\n{\"kind\": \"ep")  # + torn line
    run = report.load_run(run_dir)
    assert len(run.states) == 6 and len(run.epochs) == 24
