"""What the report compares with what, on planted effects: cells split by every flag that sets what
is pruned, how much and how (sweeps over mlp_ratio, head_ratio, target, min_keep, criterion,
sorting, calib_batches), RSST's own flags inside a cell, old records read with the value each flag
had before it existed, numerics that never pair, the fingerprint of the splits, intervals that
agree with verdicts, one-seed verdicts in the Holm family. p-values are recomputed here with
scipy's one-sample t-test on the differences and Holm written out (test_report.holm_by_hand)."""
import json
import math
import re

import pytest
from scipy.stats import norm, ttest_1samp

from test_report import holm_by_hand
from vitprune import report
from vitprune.config import Config, complete
from vitprune.report import identity

SEED_EFFECT = [-3.0, 0.0, 3.0]  # shared by both methods of a seed
WOBBLE = [0.05, -0.04, 0.0]
# The flags that did not exist at 2026-11-28 (d4fd305, e6f6ac2, 5488fc8: 2026-11-29)
LATER = ("pruned_epochs", "reg_reach", "aug", "crop_scale_min", "crop_ratio_max", "mixup_alpha", "cutmix_alpha",
         "distill", "distill_temp", "distill_alpha", "data_loader")


@pytest.fixture(autouse=True)
def no_wandb_online(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")


def folder(root, name, config: dict, finals, summary=None, state_extra=None, epochs=2):
    """A run folder holding `config` as its config.json (written as is: old records lack keys),
    final test accuracies per state (val = test), `summary` on summary.json's top level and
    `state_extra` in every state record."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(config))
    (run_dir / "summary.json").write_text(json.dumps({"name": name, "status": "finished", "config": config,
                                                      **(summary or {})}))
    records = []
    for s, acc in enumerate(finals):
        records += [{"kind": "epoch", "state": s, "epoch": e, "global_epoch": s * epochs + e, "val_acc": acc,
                     "test_acc": acc, "time_s": 1.0} for e in range(epochs)]
        records.append({"kind": "state", "state": s, "final_test_acc": acc, "final_val_acc": acc,
                        "best_test_acc": acc, "best_val_acc": acc, "params_alive": 100 if s == 0 else 30,
                        "params_total": 100, "time_s": 2.0, **(state_extra or {})})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


def config(method, seed, old=False, **flags) -> dict:
    """A run's config.json: today's fields, or (old) as written before the flags of LATER existed."""
    c = Config(**{"method": method, "dataset": "cifar100", "seed": seed, "epochs": 2, "states": 5, **flags}).to_dict()
    return {k: v for k, v in c.items() if not (old and k in LATER)}


def build(tmp_path, runs, name="r"):
    out = tmp_path / f"{name}.md"
    report.main(*map(str, runs), out=str(out))
    return out.read_text()


def key_results(md):
    return re.findall(r"^\*\*Key result\*\*.*$", md, flags=re.M)


def finals(acc):
    return [80.0, acc, acc, acc, acc]


# ---- cells respect sparsity and selection ------------------------------------------------------

SWEEPS = [("mlp_ratio", 0.3, 0.7), ("head_ratio", 0.3, 0.7), ("target", "heads", "mlp"), ("min_keep", 1, 2),
          ("criterion", "magnitude", "l2"), ("sorting", "global", "layerwise"), ("calib_batches", 8, 2)]


@pytest.mark.parametrize("flag, first, second", SWEEPS)
def test_a_sweep_over_what_is_pruned_is_two_cells(tmp_path, flag, first, second):
    """Refill and RSST at two values of a flag that sets what is pruned, how much, or how the keep
    set is chosen; RSST +1.0 (± 0.05) in both; the first value costs 9 points (a sparsity or
    selection effect, larger than the methods' gap and of the other sign)."""
    runs, diffs = [], [1.0 + w for w in WOBBLE]
    for value, base in ((first, 69.0), (second, 60.0)):
        for seed, (s, w) in enumerate(zip(SEED_EFFECT, WOBBLE)):
            for method, acc in (("refill", base + s), ("rsst", base + s + 1.0 + w)):
                runs.append(folder(tmp_path, f"{method}_{value}_s{seed}", config(method, seed, **{flag: value}),
                                   finals(acc)))
    md = build(tmp_path, runs)
    p = ttest_1samp(diffs, 0).pvalue
    holm = holm_by_hand({first: p, second: p})
    results = key_results(md)
    assert len(results) == 2, results  # one cell per value: no comparison across them
    for line in results:
        assert re.search(r"Δ rsst − refill = \+1\.00 \[[^]]*\] → \*\*rsst\*\*", line), line
        assert f"(Holm p={holm[first]:.3f}, p={p:.3f}; paired over 3 seeds)" in line, line
    assert "Holm-corrected over the 2 tests of this report" in md
    assert f"### Cell: {flag}={first}" in md and f"### Cell: {flag}={second}" in md
    assert f"Cells are split in this report by: {flag}." in md  # the header says which flags split cells
    assert f"rsst {flag}" not in md and f"refill {flag}" not in md  # never a label: no pair across cells


def test_rssts_own_flags_stay_inside_a_cell(tmp_path):
    """--reg_reach is RSST's own tuning: Refill, RSST at reach 1.0 and RSST at reach 0.5 form one
    cell of three configurations and three pairs."""
    runs = []
    for seed, s in enumerate(SEED_EFFECT):
        runs.append(folder(tmp_path, f"refill_s{seed}", config("refill", seed), finals(60 + s)))
        for reach, gain, w in ((1.0, 1.0, WOBBLE[seed]), (0.5, 2.0, -WOBBLE[2 - seed])):
            runs.append(folder(tmp_path, f"rsst_{reach}_s{seed}", config("rsst", seed, reg_reach=reach),
                               finals(60 + s + gain + w)))
    md = build(tmp_path, runs)
    assert len(key_results(md)) == 1 and "### Cell:" not in md
    assert "| Metric | refill | rsst reg_reach=1.0 | rsst reg_reach=0.5 |" in md
    assert "Holm-corrected over the 3 tests of this report" in md
    assert "Cells are split in this report by: none (one cell per data set and schedule)." in md


def test_a_reference_run_joins_every_cell_it_fits(tmp_path):
    """dense has no mlp_ratio: it is the reference column of both cells of an mlp_ratio sweep."""
    runs = [folder(tmp_path, f"dense_s{seed}", config("dense", seed), finals(70 + s))
            for seed, s in enumerate(SEED_EFFECT)]
    for value in (0.3, 0.7):
        for seed, s in enumerate(SEED_EFFECT):
            for method, acc in (("refill", 60 + s), ("rsst", 61 + s + WOBBLE[seed])):
                runs.append(folder(tmp_path, f"{method}_{value}_s{seed}", config(method, seed, mlp_ratio=value),
                                   finals(acc)))
    md = build(tmp_path, runs)
    assert md.count("| Metric | dense | refill | rsst | Δ rsst − refill") == 2


# ---- old records -------------------------------------------------------------------------------

def test_old_and_new_records_are_one_cell(tmp_path, capsys):
    """Refill folders written before aug, distill, reg_reach, pruned_epochs... existed, RSST folders
    written after; RSST +2.0 over 3 seeds: one cell, RSST named. A copy of one Refill run written
    again today counts once."""
    runs, diffs = [], [2.0 + w for w in WOBBLE]
    for seed, (s, w) in enumerate(zip(SEED_EFFECT, WOBBLE)):
        runs.append(folder(tmp_path, f"refill_old_s{seed}", config("refill", seed, old=True), finals(60 + s)))
        runs.append(folder(tmp_path, f"rsst_new_s{seed}", config("rsst", seed), finals(62 + s + w)))
    again = folder(tmp_path, "refill_new_s0", config("refill", 0), finals(60 + SEED_EFFECT[0]))
    md = build(tmp_path, runs + [again])
    p = ttest_1samp(diffs, 0).pvalue
    [line] = key_results(md)
    assert f"→ **rsst** (Holm p={p:.3f}, p={p:.3f}; paired over 3 seeds)" in line
    assert "counted once, same configuration and seed: refill_new_s0 (= refill_old_s0)" in capsys.readouterr().out


def test_reg_formula_before_it_existed_was_the_seeds():
    """RSST runs recorded before --reg_formula existed used the seed's formula: the same
    configuration as one run with --reg_formula=seed today, not as one with the default."""
    old = {k: v for k, v in config("rsst", 0, old=True).items() if k not in ("reg_formula", "reg_residual")}
    seed_today = config("rsst", 0, reg_formula="seed")
    assert identity.identity(old, {}) == identity.identity(seed_today, {})
    assert identity.identity(old, {}) != identity.identity(config("rsst", 0), {})
    assert complete(old)["reg_formula"] == "seed" and complete({})["aug"] == "crop_flip"
    # the synthetic set's split before --val_size: 500 of its 4,500 images; CIFAR's 5,000 of 50,000
    assert complete({"dataset": "synthetic"})["val_size"] == 500
    assert complete({"dataset": "cifar10"})["val_size"] == 0.1


def test_old_rsst_records_are_labelled_by_their_formula(tmp_path):
    runs = []
    for seed, s in enumerate(SEED_EFFECT):
        old = {k: v for k, v in config("rsst", seed, old=True).items() if k not in ("reg_formula", "reg_residual")}
        runs += [folder(tmp_path, f"refill_s{seed}", config("refill", seed), finals(60 + s)),
                 folder(tmp_path, f"rsst_old_s{seed}", old, finals(61 + s + WOBBLE[seed])),
                 folder(tmp_path, f"rsst_new_s{seed}", config("rsst", seed), finals(61.5 + s))]
    md = build(tmp_path, runs)
    assert "| Metric | refill | rsst reg_formula=seed | rsst reg_formula=residual |" in md


# ---- numerics -----------------------------------------------------------------------------------

BF16 = {"precision": "bf16", "device_type": "cuda", "kernels_backend": "triton"}
FP32 = {"precision": "fp32", "device_type": "cpu", "kernels_backend": "torch"}


def test_runs_of_different_numerics_are_never_paired(tmp_path, capsys):
    """A bf16 Refill run and an fp32 RSST run of each seed: two cells (by precision, device and
    kernels), no comparison; the same configuration and seed in bf16 and fp32 are not duplicates."""
    runs = []
    for seed, s in enumerate(SEED_EFFECT):
        runs += [folder(tmp_path, f"refill_bf16_s{seed}", config("refill", seed), finals(60 + s), summary=BF16),
                 folder(tmp_path, f"rsst_fp32_s{seed}", config("rsst", seed), finals(62 + s), state_extra=FP32)]
    md = build(tmp_path, runs)
    assert "**rsst**" not in md and "Δ rsst − refill" not in md
    assert "### Cell: device_type=cuda, kernels_backend=triton, precision=bf16" in md
    assert "### Cell: device_type=cpu, kernels_backend=torch, precision=fp32" in md
    assert "Cells are split in this report by: device_type, kernels_backend, precision." in md
    twin = folder(tmp_path, "refill_fp32_s0", config("refill", 0), finals(59), summary=FP32)
    md = build(tmp_path, [runs[0], twin], "twins")
    assert "counted once" not in capsys.readouterr().out
    assert "| refill_bf16_s0 |" in md and "| refill_fp32_s0 |" in md


def test_numerics_fall_back_to_the_flags():
    """Records before the resolved values: the flags, resolved where they tell (a Triton backend ran
    on CUDA; auto precision is bf16 on CUDA, fp32 on the CPU); `auto` that nothing resolves stays."""
    n = lambda recorded=None, **flags: identity.numerics(Config(**flags).to_dict(), recorded or {})
    assert n(FP32) == {**FP32, "compile": False}
    assert n(precision="bf16", device="cuda:1") == {"precision": "bf16", "device_type": "cuda",
                                                    "kernels_backend": "auto", "compile": False}
    assert n({"kernels_backend": "triton"})["precision"] == "bf16"  # auto on the CUDA Triton ran on
    assert n(device="cpu")["precision"] == "fp32"
    assert n({"kernels_backend": "torch"}) == {"precision": "auto", "device_type": "auto",
                                               "kernels_backend": "torch", "compile": False}
    assert n(compile=True)["compile"] is True


# ---- pairing is verified --------------------------------------------------------------------------

def test_a_pair_whose_splits_differ_is_refused(tmp_path):
    """Seed 1's RSST run drew its split with another seed (its split fingerprint differs from
    Refill's): the report pairs seeds 0 and 2 only and names the refused pair in one line."""
    runs, diffs = [], {}
    for seed, (s, gap) in enumerate(zip(SEED_EFFECT, [1.0, 9.0, 1.2])):
        split = {"split_fingerprint": f"{seed:064x}"}
        runs.append(folder(tmp_path, f"refill_s{seed}", config("refill", seed), finals(60 + s), summary=split))
        other = {"split_fingerprint": f"{seed + 100:064x}"} if seed == 1 else split
        runs.append(folder(tmp_path, f"rsst_s{seed}", config("rsst", seed), finals(60 + s + gap), state_extra=other))
        diffs[seed] = gap
    md = build(tmp_path, runs)
    refused = [line for line in md.splitlines() if line.startswith("Refused pairs")]
    assert refused == ["Refused pairs (the runs' val/test splits differ: `split_fingerprint`): "
                       "refill_s1 × rsst_s1 (seed 1)."]
    [line] = key_results(md)
    assert "= +1.10 [" in line and "paired over 2 seeds" in line


def test_records_without_a_fingerprint_are_paired_and_named(tmp_path):
    runs = [folder(tmp_path, f"{m}_s{seed}", config(m, seed), finals(60 + s + (m == "rsst")))
            for seed, s in enumerate(SEED_EFFECT) for m in ("refill", "rsst")]
    md = build(tmp_path, runs)
    assert "Paired without a split fingerprint (records written before it was recorded): " in md
    assert "Refused pairs" not in md


# ---- intervals and verdicts ------------------------------------------------------------------------

def test_an_interval_that_excludes_zero_never_stands_beside_a_bare_within_noise(tmp_path):
    """Geometric, 4 seeds, 6 states compared: at state 2 RSST is ahead at p ≈ 0.02 (its raw 95%
    interval excludes 0) but not after Holm over 6 tests; at state 4 it wins after Holm. Every row:
    an interval that excludes 0 stands beside a winner or beside "not significant after Holm"; an
    interval that holds 0 never beside a winner."""
    gaps = {s: [0.3, -0.2, 0.1, -0.25] for s in range(1, 7)}
    gaps[2] = [0.6, 1.6, 0.5, 1.3]
    gaps[4] = [3.0, 3.1, 2.95, 3.05]
    runs = []
    for seed, effect in enumerate(SEED_EFFECT + [1.5]):
        refill = [80.0] + [70 - 2 * s + effect for s in range(1, 7)]
        rsst = [80.0] + [refill[s] + gaps[s][seed] for s in range(1, 7)]
        runs += [folder(tmp_path, f"refill_s{seed}", config("refill", seed, schedule="geometric", states=7), refill),
                 folder(tmp_path, f"rsst_s{seed}", config("rsst", seed, schedule="geometric", states=7), rsst)]
    md = build(tmp_path, runs)
    ps = {s: ttest_1samp(g, 0).pvalue for s, g in gaps.items()}
    holm = holm_by_hand(ps)
    assert ps[2] < 0.05 < holm[2] and holm[4] < 0.05
    assert "| Δ rsst − refill [95% CI, unadjusted] |" in md
    row = next(line for line in md.splitlines() if line.startswith("| 2 |"))
    assert (f"within noise: not significant after Holm over 6 tests (Holm p={holm[2]:.2f}, p={ps[2]:.3f}; "
            f"paired over 4 seeds)") in row
    checked = 0
    for line in md.splitlines():
        m = re.search(r"\| [+-]\d+\.\d\d \[([+-]\d+\.\d\d), ([+-]\d+\.\d\d)\] \| ([^|]*) \|", line)
        if not m:
            continue
        low, high, verdict = float(m[1]), float(m[2]), m[3]
        if low > 0 or high < 0:
            assert verdict.startswith("**") or "not significant after Holm over 6 tests" in verdict, line
        else:
            assert not verdict.startswith("**") and "not significant after Holm" not in verdict, line
        checked += 1
    assert checked == 8  # State 1 and the last common state, the six states one by one: both sides


# ---- one-seed verdicts join the Holm family -----------------------------------------------------------

def one_seed_cells(tmp_path, ratios):
    """One seed per method and ratio; states 2-4 spread with std 1.0 in both runs; State 1 apart by
    3.0 (z = 3.0 / √2 = 2.12, p = 0.034 alone)."""
    runs = []
    for ratio in ratios:
        runs += [folder(tmp_path, f"refill_{ratio}", config("refill", 0, ratio=ratio), [70, 50.0, 60, 61, 59]),
                 folder(tmp_path, f"rsst_{ratio}", config("rsst", 0, ratio=ratio), [70, 53.0, 55, 56, 54])]
    return runs


def test_one_seed_verdicts_are_holm_corrected_with_the_rest(tmp_path):
    p = math.erfc(3.0 / math.sqrt(2) / math.sqrt(2))  # two-sided normal tail of z = Δ / (√2σ)
    assert p == pytest.approx(2 * norm.sf(3.0 / math.sqrt(2)))
    md = build(tmp_path / "one", one_seed_cells(tmp_path / "one", [0.5]))
    [line] = key_results(md)
    assert line.endswith(f"Δ rsst − refill = +3.00 → **rsst** beyond within-run noise (z = 2.12 against "
                         f"√2σ = 1.41; Holm p={p:.3f}, p={p:.3f}; one seed: not a seed-to-seed result).")
    ratios = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    md = build(tmp_path / "six", one_seed_cells(tmp_path / "six", ratios))
    results = key_results(md)
    assert len(results) == 6 and "**rsst**" not in md
    holm = min(1.0, 6 * p)  # six equal p-values
    assert all(f"within noise: not significant after Holm over 6 tests (z = 2.12 against √2σ = 1.41; "
               f"Holm p={holm:.2f}, p={p:.3f}; one seed)" in line for line in results), results
    assert "Holm-corrected over the 6 tests of this report** (6 of them one-seed)" in md
