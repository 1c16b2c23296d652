"""The report's numbers and its verdict policy: per-run statistics, configurations, the noise
rules and which comparison may name a winner under which schedule. Imports no torch."""
import math
import statistics
from typing import NamedTuple, Optional

from vitprune.config import applies, configuration
from vitprune.report.runs import HEADLINE, BEST_EPOCH, RunRecords

VAL_OF = {HEADLINE: "final_val_acc", BEST_EPOCH: "best_val_acc"}  # the val twin that selects states
RISING = 0.5  # state 0 is "still rising" when its last k epochs beat the k before by > 0.5 points


def mean(xs):
    return statistics.fmean(xs) if xs else None


def std(xs):
    return statistics.stdev(xs) if len(xs) >= 2 else None


def late_start(n):
    return max(2, n - math.ceil(n / 3))


def run_stats(run: RunRecords, n=None, key=HEADLINE) -> dict:
    """The seed's per-run numbers from states 0..n-1 (None = n/a). The best pruned state is the
    one with the best val accuracy; its test accuracy is reported."""
    accs, vals = run.acc(key, n), run.acc(VAL_OF[key], n)
    n = len(accs)
    later = accs[2:]
    best_state = None
    if n >= 2:
        scores = [v if v is not None else a for v, a in zip(vals[1:], accs[1:])]  # old records: no val
        best_state = 1 + scores.index(max(scores))
    return {
        "state0": accs[0] if accs else None,
        "state1": accs[1] if n >= 2 else None,
        "best": accs[best_state] if best_state else None,
        "best_state": best_state,
        "mean": mean(later),
        "std": std(later),
        "retention": 100 * accs[best_state] / accs[0] if best_state and accs[0] else None,
        "late": mean(accs[late_start(n):]) if n >= 3 else None,
        "last": accs[-1] if n >= 2 else None,
    }


def configurations(runs) -> dict:
    """{label: [runs]} for the runs of one dataset; label = method (+ what else differs and
    applies to the run's method)."""
    key = lambda r: tuple(sorted((k, str(v)) for k, v in configuration(r.config).items()))
    keys = [dict(k) for k in dict.fromkeys(key(r) for r in runs)]
    differing = [k for k in dict.fromkeys(f for c in keys for f in c)
                 if k != "method" and len({c[k] for c in keys if k in c}) > 1]
    groups = {}
    for r in runs:
        c = dict(key(r))
        r.label = " ".join([c.get("method", "?")] + [f"{k}={c[k]}" for k in differing if k in c])
        groups.setdefault(r.label, []).append(r)
    return groups


def within_run_noise(groups: dict, n: int, schedule: str, key=HEADLINE) -> dict:
    """{label: std over states >= 2, averaged over the label's runs}: the noise of retraining one
    ticket, under oneshot only (under geometric the states differ in sparsity)."""
    if schedule != "oneshot":
        return {label: None for label in groups}
    stds = {label: [run_stats(r, n, key)["std"] for r in runs] for label, runs in groups.items()}
    return {label: mean([s for s in ss if s is not None]) for label, ss in stds.items()}


# ---- the verdict policy -------------------------------------------------------------------
# What is compared, and when a winner is named:
# - runs of one dataset and schedule are compared over their common states 0..n-1;
# - a configuration = the runs that differ only in seed (and in flags that do not apply to their
#   method, or only say how to execute): its label names what differs and applies to it;
# - any "best state" is chosen by VALIDATION accuracy (over states >= 1) and reported with its test
#   accuracy: a maximum over noisy test scores would select on the test set;
# - oneshot: every state >= 2 retrains the same ticket for every method (the selection is monotone:
#   same keep set, no RSST targets), so only State 1 can tell the methods apart. States >= 2 are
#   marked "same ticket, retrained", carry no winner, and their spread is the within-run noise;
# - geometric: every state has its own sparsity, so there is no within-run noise; methods are
#   compared state by state, over seeds;
# - winner: with >= 2 seeds per configuration, Welch's t-test on the per-seed values (p < 0.05);
#   with one seed (oneshot only), a gap beyond 2x the larger within-run std is reported as such,
#   never as a seed-to-seed result; under geometric one seed gives no verdict;
# - an RSST state whose targets kept more than NOT_ZEROED of their norm at the hard prune is
#   flagged: its hard prune was a prune of live weights, not of zeroed ones.
# POLICY: what each row of the comparison (a run_stats key) may conclude, per schedule:
# "compare" (a winner can be named), or the reason none can.
POLICY = {
    "oneshot": {"state0": "– (dense: the same recipe for every method)", "state1": "compare",
                "best": "– (states ≥ 2: same ticket, retrained)", "mean": "– (same ticket, retrained)",
                "std": "– (within-run noise)", "retention": "– (states ≥ 2: same ticket, retrained)",
                "late": "– (same ticket, retrained)", "last": "– (same ticket, retrained)"},
    "geometric": {"state0": "– (dense: the same recipe for every method)", "state1": "compare",
                  "best": "– (states differ in sparsity)", "mean": "– (states differ in sparsity)",
                  "std": "– (states differ in sparsity: not noise)", "retention": "– (states differ in sparsity)",
                  "late": "– (states differ in sparsity)", "last": "compare"},
}


def row_verdict(metric, values: dict, noise: dict, schedule="oneshot"):
    """(Δ, verdict) of one row of the comparison, as POLICY allows for the schedule."""
    policy = POLICY[schedule][metric]
    return decide(values, noise, schedule) if policy == "compare" else (None, policy)


def state_verdict(state, values: dict, noise: dict, schedule="oneshot"):
    """(Δ, verdict) of one state compared across configurations: none for oneshot states >= 2."""
    if schedule == "oneshot" and state >= 2:
        return None, "– (same ticket, retrained)"
    return decide(values, noise, schedule)


def decide(values: dict, noise: dict, schedule="oneshot"):
    """(Δ best − next, verdict) for {label: per-seed values}; noise = {label: within-run std}."""
    ranked = sorted((k for k in values if values[k]), key=lambda k: -mean(values[k]))
    if len(ranked) < 2:
        return None, "–"
    a, b = ranked[:2]
    delta = mean(values[a]) - mean(values[b])
    if len(values[a]) >= 2 and len(values[b]) >= 2:
        if statistics.stdev(values[a]) == statistics.stdev(values[b]) == 0:  # Welch is undefined
            return delta, "n/a (no seed variance)"
        from scipy.stats import ttest_ind
        p = ttest_ind(values[a], values[b], equal_var=False).pvalue
        seeds = f"{min(len(values[a]), len(values[b]))}+ seeds"
        return delta, f"**{a}** (Welch p={p:.3f}, {seeds})" if p < 0.05 else f"within noise (Welch p={p:.2f}, {seeds})"
    if schedule != "oneshot":
        return delta, "no verdict: one seed, and no within-run noise under geometric (run several seeds)"
    if noise.get(a) is None or noise.get(b) is None:
        return delta, "no verdict: one seed, and within-run noise needs >= 4 states"
    bar = 2 * max(noise[a], noise[b])
    if delta > bar:
        return delta, f"**{a}** beyond within-run noise (2σ = {bar:.2f}; one seed: not a seed-to-seed result)"
    return delta, f"within noise (2σ = {bar:.2f}, within-run; one seed)"


# ---- compute: accuracy per training FLOP, and the equal-compute verdict ---------------------
# Records written since compute accounting carry, in every epoch and state record, the training
# FLOPs (`train_flops`) and wall seconds (`train_time_s`) of the run so far. Older records have
# neither: their runs get no compute figure and no equal-compute verdict, and the report says so.
# - prune-and-fine-tune is the loop configured as refill, 2 states, --rewind=none: prune once after
#   State 0 and train the ticket one long state (--pruned_epochs) from State 0's weights;
# - a cell is the set of runs that agree on everything except how the loop is shaped (method,
#   states, epochs, pruned_epochs, rewind, schedule) and seed: same model, data, ratio, recipe;
# - a run's result is its best pruned state by validation accuracy (its test accuracy), charged
#   with the compute of the whole run: choosing a state by val needs every state trained;
# - equal compute: the fine-tune run of the same seed whose total training FLOPs are within
#   EQUAL_COMPUTE (10%) of the loop's; the verdict is a paired t-test over those seeds, Holm-
#   corrected over every equal-compute comparison of the report, a winner named at p < 0.05.
COMPUTE = "train_flops"
EQUAL_COMPUTE = 0.10
LOOP_SHAPE = ("method", "states", "epochs", "pruned_epochs", "rewind", "schedule")
ALPHA = 0.05


class Paired(NamedTuple):
    """A paired comparison of two methods over seeds: mean of a − b, its 95% t-interval, p, seeds."""
    delta: Optional[float]
    low: Optional[float]
    high: Optional[float]
    p: Optional[float]
    n: int


def paired_test(a: dict, b: dict) -> Paired:
    """a − b over the seeds both have ({seed: value} each): the mean difference, its 95%
    t-interval and the two-sided p of the paired t-test. One seed: no interval and no p; no
    spread in the differences: the interval is the point and p is None (undefined)."""
    d = [a[s] - b[s] for s in sorted(a.keys() & b.keys())]
    n = len(d)
    if n < 2:
        return Paired(d[0] if d else None, None, None, None, n)
    delta, sd = statistics.fmean(d), statistics.stdev(d)
    if sd == 0:
        return Paired(delta, delta, delta, None, n)
    from scipy.stats import t
    se = sd / math.sqrt(n)
    half = t.ppf(0.975, n - 1) * se
    return Paired(delta, delta - half, delta + half, float(2 * t.sf(abs(delta) / se, n - 1)), n)


def has_compute(run: RunRecords) -> bool:
    return bool(run.states) and all(s.get(COMPUTE) is not None for s in run.states)


def is_finetune(config: dict) -> bool:
    """Prune-and-fine-tune: refill pruning once after State 0, one state trained from its weights."""
    return config.get("method") == "refill" and config.get("states") == 2 and config.get("rewind") == "none"


def cell_key(config: dict) -> tuple:
    """What a run computes, apart from the shape of its loop and its seed (see above)."""
    return tuple(sorted((k, str(v)) for k, v in configuration(config).items()
                        if k not in LOOP_SHAPE and applies(k, {**config, "method": "refill"})))


def compute_cells(runs) -> list:
    """[(title, runs with train_flops, runs without)] per cell, in the order of the runs."""
    cells = {}
    for r in runs:
        cells.setdefault(cell_key(r.config), []).append(r)
    keys = [dict(k) for k in cells]
    shown = ["dataset", "model", "ratio"] + [k for k in dict.fromkeys(f for c in keys for f in c)
                                             if k not in ("dataset", "model", "ratio") and len({c.get(k) for c in keys}) > 1]
    out = []
    for key, members in cells.items():
        c = dict(key)
        title = ", ".join(f"{k}={c[k]}" if k not in ("dataset", "model") else c[k] for k in shown if k in c)
        out.append((title, [r for r in members if has_compute(r)], [r for r in members if not has_compute(r)]))
    return out


def run_result(run: RunRecords):
    """(best pruned test accuracy by val, training FLOPs of the whole run), None if either is missing."""
    best = run_stats(run)["best"]
    return None if best is None or not has_compute(run) else (best, run.states[-1][COMPUTE])


def matching_pruned_epochs(run: RunRecords) -> Optional[float]:
    """--pruned_epochs of the prune-and-fine-tune whose training compute equals this loop's: what
    the loop spent after State 0, in epochs of its last state (the final ticket, trained as the
    fine-tune trains it, teacher included), from its records. None without compute or pruned state."""
    if not has_compute(run) or len(run.states) < 2 or is_finetune(run.config):
        return None
    c = run.config
    rewind = str(c.get("rewind", "init"))
    epochs = (c.get("pruned_epochs") or c.get("epochs")) - (int(rewind[6:]) if rewind.startswith("epoch:") else 0)
    flops = [s[COMPUTE] for s in run.states]
    per_epoch = (flops[-1] - flops[-2]) / epochs
    return (flops[-1] - flops[0]) / per_epoch if per_epoch > 0 else None


class EqualCompute(NamedTuple):
    """A ticket-loop configuration against prune-and-fine-tune in one cell, at equal compute."""
    loop: str
    finetune: str
    ratio: Optional[float]   # fine-tune / loop training FLOPs, mean over the paired seeds
    loop_acc: dict           # {seed: accuracy} of the seeds at equal compute
    finetune_acc: dict
    test: Paired
    verdict: str


def shape_label(config: dict) -> str:
    """A configuration of a cell by the shape of its loop: 'refill loop, 16 × 60 epochs',
    'prune-and-fine-tune, 60 + 900 epochs'."""
    epochs, later = config.get("epochs"), config.get("pruned_epochs") or config.get("epochs")
    if is_finetune(config):
        return f"prune-and-fine-tune, {epochs} + {later} epochs"
    text = f"{config.get('method')} loop, {config.get('states')} × {epochs} epochs"
    text += f" (states ≥ 1: {later})" if later != epochs else ""
    extra = [config.get(k) for k in ("schedule", "rewind") if config.get(k) not in (None, "oneshot", "init")]
    return text + "".join(f", {x}" for x in extra)


def cell_groups(cell_runs) -> dict:
    """{label: [runs]} of one cell's configurations, labelled by shape_label and what else differs."""
    key = lambda r: tuple(sorted((k, str(v)) for k, v in configuration(r.config).items()))
    keys = [dict(k) for k in dict.fromkeys(key(r) for r in cell_runs)]
    differing = [k for k in dict.fromkeys(f for c in keys for f in c)
                 if k not in LOOP_SHAPE and len({c[k] for c in keys if k in c}) > 1]
    groups = {}
    for r in cell_runs:
        c = dict(key(r))
        label = " ".join([shape_label(r.config)] + [f"{k}={c[k]}" for k in differing if k in c])
        groups.setdefault(label, []).append(r)
    return groups


def equal_compute(cell_runs) -> list:
    """An EqualCompute per refill/rsst loop configuration of a cell holding a prune-and-fine-tune
    configuration (the fine-tune closest in compute when it holds several); verdicts uncorrected."""
    groups = cell_groups(cell_runs)
    finetunes = {k: g for k, g in groups.items() if is_finetune(g[0].config)}
    loops = {k: g for k, g in groups.items() if k not in finetunes and g[0].config.get("method") in ("refill", "rsst")}
    rows = []
    for label, loop in loops.items():
        pairs = {f: _pairs(loop, ft) for f, ft in finetunes.items()}
        if not pairs:
            continue
        distance = lambda k: abs(math.log(pairs[k][1])) if pairs[k][1] else math.inf  # in compute
        f = max(pairs, key=lambda k: (len(pairs[k][0]), -distance(k)))
        within, ratio = pairs[f]
        loop_acc, ft_acc = {s: a for s, (a, _) in within.items()}, {s: b for s, (_, b) in within.items()}
        rows.append(EqualCompute(label, f, ratio, loop_acc, ft_acc, paired_test(loop_acc, ft_acc), ""))
    return rows


def _pairs(loop, finetune):
    """({seed: (loop acc, fine-tune acc)} of the seeds at equal compute, mean FLOPs ratio fine-tune /
    loop over every seed both have (None if none))."""
    results = lambda runs: {r.config.get("seed"): run_result(r) for r in runs if run_result(r)}
    a, b = results(loop), results(finetune)
    seeds = sorted(a.keys() & b.keys())
    ratios = {s: b[s][1] / a[s][1] for s in seeds}
    within = {s: (a[s][0], b[s][0]) for s in seeds if abs(ratios[s] - 1) <= EQUAL_COMPUTE}
    return within, mean(list(ratios.values()))


def equal_compute_verdicts(rows: list) -> list:
    """The rows with their verdicts: Holm's correction over every row's p (the tests of one report)."""
    ps = sorted((row.test.p, i) for i, row in enumerate(rows) if row.test.p is not None)
    adjusted, running = {}, 0.0
    for rank, (p, i) in enumerate(ps):
        running = max(running, min(1.0, (len(ps) - rank) * p))
        adjusted[i] = running
    return [row._replace(verdict=_equal_verdict(row, adjusted.get(i))) for i, row in enumerate(rows)]


def _equal_verdict(row: EqualCompute, p_holm) -> str:
    t = row.test
    if t.n == 0:
        near = "" if row.ratio is None else f" (fine-tune / loop = {row.ratio:.2f})"
        return f"no verdict: no seed with the fine-tune's compute within ±{EQUAL_COMPUTE:.0%} of the loop's{near}"
    if t.n == 1:
        return "no verdict: one seed at equal compute (run several seeds)"
    if t.p is None:
        return "n/a (no seed variance)"
    if p_holm >= ALPHA:
        return f"within noise (paired t, Holm p={p_holm:.2f}, {t.n} seeds)"
    winner = row.loop if t.delta > 0 else row.finetune
    return f"**{winner}** (paired t, Holm p={p_holm:.3f}, {t.n} seeds)"


# The state a row of the comparison table is about, for its "compute to reach this state" column:
# rows over a span of states (mean, std, late) reach it at the span's end, the last common state.
def compute_to_reach(runs, metric: str, n: int, key=HEADLINE):
    """Mean training FLOPs over the runs up to the end of the state the row `metric` reports."""
    flops = []
    for r in runs:
        stats = run_stats(r, n, key)
        state = {"state0": 0, "state1": 1, "best": stats["best_state"],
                 "retention": stats["best_state"]}.get(metric, n - 1)
        if state is not None and state < n and (metric == "state0" or n >= 2):
            flops.append(r.states[state].get(COMPUTE))
    return None if not flops or None in flops else mean(flops)
