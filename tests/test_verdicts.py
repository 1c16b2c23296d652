"""The report's verdict on planted effects: like with like (cells), paired by seed, Holm over the
report's tests, the one-seed bar, --rewind=none, de-duplication, folder data sets, ⚠ per group.
Expected p-values are recomputed here with scipy's one-sample t-test on the differences."""
import re

import pytest
from scipy.stats import norm, ttest_1samp

from test_report import holm_by_hand, write_run
from vitprune import report

SEED_EFFECT = [-3.0, 0.0, 3.0]  # shared by both methods of a seed: large next to the methods' gap


@pytest.fixture(autouse=True)
def no_wandb_online(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")


def key_results(md):
    return re.findall(r"^\*\*Key result\*\*.*$", md, flags=re.M)


def test_ratio_sweep_rsst_wins_every_cell(tmp_path):
    """(a) RSST beats Refill by 1.0 ± 0.05 on every seed at every ratio; the ratios' means lie
    0.2 apart, closer than the margin, so ranking all configurations would test RSST against RSST;
    the seed effect (±3) drowns the gap for an unpaired test."""
    wobble = {0.3: [0.05, -0.04, 0.0], 0.5: [0.0, 0.04, -0.05], 0.7: [-0.03, 0.05, 0.01], 0.9: [0.02, -0.05, 0.04]}
    runs, diffs = [], {}
    for i, ratio in enumerate(wobble):
        base = 60 + 0.2 * i
        for seed, (s, w) in enumerate(zip(SEED_EFFECT, wobble[ratio])):
            for method, acc in (("refill", base + s), ("rsst", base + s + 1.0 + w)):
                runs.append(write_run(tmp_path, method, [70, acc, acc, acc, acc], seed, ratio=ratio,
                                      name=f"{method}_r{ratio}_s{seed}"))
        diffs[ratio] = [1.0 + w for w in wobble[ratio]]
    out = tmp_path / "r.md"
    report.main(*map(str, runs), out=str(out))
    md = out.read_text()
    assert "Holm-corrected over the 4 tests of this report" in md  # one test per ratio: State 1
    assert md.count("| Metric | refill | rsst | Δ rsst − refill [95% CI, unadjusted] | Winner (paired; Holm over 4 tests) |") == 4
    holm = holm_by_hand({r: ttest_1samp(d, 0).pvalue for r, d in diffs.items()})
    results = key_results(md)
    assert len(results) == 4
    for ratio, line in zip(wobble, results):
        p = ttest_1samp(diffs[ratio], 0).pvalue
        assert f"→ **rsst** (Holm p={holm[ratio]:.3f}, p={p:.3f}; paired over 3 seeds)" in line, (ratio, line)
    for ratio in wobble:
        assert f"### Cell: ratio={ratio}" in md


def test_no_difference_no_winner(tmp_path):
    """(b) The same values ± noise: no winner after correction."""
    noise = [[0.3, -0.2, 0.1], [-0.1, 0.25, -0.3], [0.2, 0.1, -0.25]]
    runs = []
    for i, ratio in enumerate((0.5, 0.7, 0.9)):
        for seed, (s, e) in enumerate(zip(SEED_EFFECT, noise[i])):
            runs.append(write_run(tmp_path, "refill", [70, 60 + s, 61, 61, 61], seed, ratio=ratio,
                                  name=f"refill_r{ratio}_s{seed}"))
            runs.append(write_run(tmp_path, "rsst", [70, 60 + s + e, 61, 61, 61], seed, ratio=ratio,
                                  name=f"rsst_r{ratio}_s{seed}"))
    out = tmp_path / "r.md"
    report.main(*map(str, runs), out=str(out))
    md = out.read_text()
    results = key_results(md)
    assert len(results) == 3 and all("→ within noise (Holm p=" in line for line in results)
    assert "**rsst**" not in md and "**refill**" not in md


def test_one_spurious_state_among_eight_is_no_winner_after_holm(tmp_path):
    """(c) Geometric, 8 states (7 compared), 3 seeds: state 4 differs at p ≈ 0.03, the others not."""
    gaps = {s: [0.5, -0.4, 0.1] if s % 2 else [-0.3, 0.2, 0.4] for s in range(1, 8)}
    gaps[4] = [1.0, 1.3, 0.7]
    runs = []
    for seed, effect in enumerate(SEED_EFFECT):
        refill = [80.0] + [70 - 2 * s + effect for s in range(1, 8)]
        rsst = [80.0] + [refill[s] + gaps[s][seed] for s in range(1, 8)]
        runs += [write_run(tmp_path, "refill", refill, seed, schedule="geometric"),
                 write_run(tmp_path, "rsst", rsst, seed, schedule="geometric")]
    out = tmp_path / "r.md"
    report.main(*map(str, runs), out=str(out))
    md = out.read_text()
    ps = {s: ttest_1samp(g, 0).pvalue for s, g in gaps.items()}
    assert 0.02 < ps[4] < 0.04 and min(p for s, p in ps.items() if s != 4) > 0.3
    holm = holm_by_hand(ps)
    assert "Holm-corrected over the 7 tests of this report" in md
    row = next(line for line in md.splitlines() if line.startswith("| 4 |"))
    # its raw interval excludes 0: the verdict says why that is no winner
    assert f"within noise: not significant after Holm over 7 tests (Holm p={holm[4]:.2f}, p={ps[4]:.3f}; " \
        f"paired over 3 seeds)" in row
    assert "**rsst**" not in md and "**refill**" not in md


def test_one_seed_gap_of_2_5_sigma_is_no_winner(tmp_path):
    """One seed each: states 2-4 spread with std 1.0 in both runs; State 1 apart by 2.5σ. The
    difference of two single values has std √2·σ: z = 2.5 / √2 = 1.77, p = 0.077 (the one test)."""
    refill = write_run(tmp_path, "refill", [70, 50.0, 60, 61, 59])
    rsst = write_run(tmp_path, "rsst", [70, 52.5, 55, 56, 54])
    out = tmp_path / "r.md"
    report.main(str(refill), str(rsst), out=str(out))
    md = out.read_text()
    [line] = key_results(md)
    p = 2 * norm.sf(2.5 / 2 ** 0.5)
    assert line.endswith(f"Δ rsst − refill = +2.50 → within noise (z = 1.77 against √2σ = 1.41; Holm p={p:.2f}, "
                         f"p={p:.2f}; one seed).")
    far = write_run(tmp_path / "far", "rsst", [70, 53.0, 55, 56, 54])  # 3σ: z = 2.12, p = 0.034, labelled
    report.main(str(refill), str(far), out=str(out))
    [line] = key_results(out.read_text())
    p = 2 * norm.sf(3 / 2 ** 0.5)
    assert f"**rsst** beyond within-run noise (z = 2.12 against √2σ = 1.41; Holm p={p:.3f}, p={p:.3f}; one seed: " \
        "not a seed-to-seed result)" in line


def test_rewind_none_compares_states_after_the_first(tmp_path):
    """--rewind=none under oneshot: each method carries its own weights into states >= 2, so
    they are compared state by state (here RSST is ahead at states 2 and 3 only)."""
    runs = []
    for seed, (effect, w) in enumerate(zip(SEED_EFFECT, [0.1, -0.1, 0.05])):
        runs += [write_run(tmp_path, "refill", [80, 60 + effect, 62 + effect, 63 + effect], seed, rewind="none"),
                 write_run(tmp_path, "rsst", [80, 60 + effect + w, 65 + effect + w, 66 + effect - w], seed,
                           rewind="none")]
    out = tmp_path / "r.md"
    report.main(*map(str, runs), out=str(out))
    md = out.read_text()
    assert "with `--rewind=none`" in md and "same ticket" not in md
    assert "Holm-corrected over the 3 tests of this report" in md
    rows = {line.split(" | ")[0][2:]: line for line in md.splitlines() if re.match(r"\| [123] \|", line)}
    assert "within noise" in rows["1"] and "**rsst**" in rows["2"] and "**rsst**" in rows["3"]
    # the same runs with rewinding: only State 1 is compared
    rewound = [write_run(tmp_path / "init", m, [80, 60 + e, 62 + e + 3 * (m == "rsst"), 63 + e], seed)
               for seed, e in enumerate(SEED_EFFECT) for m in ("refill", "rsst")]
    report.main(*map(str, rewound), out=str(out))
    md = out.read_text()
    assert "| 2 |" in md and "– (same ticket, retrained)" in md and "**rsst**" not in md


def test_same_run_twice_counts_once(tmp_path, capsys):
    a = write_run(tmp_path, "refill", [70, 60, 61, 62, 61], name="a")
    b = write_run(tmp_path, "refill", [70, 60, 61, 62, 61], name="b")  # the same configuration and seed
    c = write_run(tmp_path, "rsst", [70, 61, 61, 62, 61], name="c")
    out = tmp_path / "r.md"
    report.main(str(a), str(b), str(c), out=str(out))
    printed = capsys.readouterr().out.splitlines()
    assert [line for line in printed if "warning" in line] == [
        "report: warning: counted once, same configuration and seed: b (= a)"]
    md = out.read_text()
    assert "| State 1 (the methods' tickets) | 60.00% | 61.00% |" in md  # one seed, not two
    assert "| b |" not in md


def test_report_on_folder_dataset_runs(tmp_path):
    runs = [write_run(tmp_path, m, [50, 45 + m.startswith("r") * 2, 46, 47, 46], dataset="folder:/data/flowers",
                      name=f"flowers_{m}") for m in ("refill", "rsst")]
    out = tmp_path / "out" / "r.md"
    report.main(*map(str, runs), out=str(out))
    md = out.read_text()
    assert "## folder:/data/flowers" in md
    for kind in ("states", "epochs"):
        png = out.parent / f"r_flowers_{kind}.png"
        assert f"]({png.name})" in md and png.stat().st_size > 1000
    assert report.file_stem("folder:/my data/ä b/") == "b" and report.file_stem("folder:../..") == "data"


def test_largest_target_flags_every_shown_state(tmp_path):
    """The aggregate target norm is under 0.1 at every state, but at state 2 one group kept 0.3:
    state 2 is flagged wherever it shows (state by state, last common state, per-state table)."""
    extra = [{}, {"target_norm_ratio": 0.02, "target_norm_ratio_max": 0.05},
             {"target_norm_ratio": 0.04, "target_norm_ratio_max": 0.3}]
    runs = [write_run(tmp_path, "refill", [70, 60, 55], schedule="geometric"),
            write_run(tmp_path, "rsst", [70, 61, 56], schedule="geometric", extra=extra)]
    r = report.load_run(runs[1])
    assert [r.not_zeroed(s) for s in range(3)] == [False, False, True]
    out = tmp_path / "r.md"
    report.main(*map(str, runs), out=str(out))
    md = out.read_text()
    assert "| State 1 (the methods' tickets) | 60.00% | 61.00% |" in md  # state 1: fine
    assert "| Last common state (2) | 55.00% | 56.00% ⚠ |" in md and "| Mean, state 2 | 55.00% | 56.00% ⚠ |" in md
    assert "| 1 | 60.00% | 61.00% |" in md and "| 2 | 55.00% | 56.00% ⚠ |" in md
    assert "| largest target group's norm at hard prune (RSST) |  | 0.050 | 0.300 ⚠ |" in md
    assert "| targets' norm at hard prune (RSST) |  | 0.020 | 0.040 |" in md
