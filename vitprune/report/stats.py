"""The report's numbers and its verdict policy: per-run statistics, configurations, the noise
rules and which comparison may name a winner under which schedule. Imports no torch."""
import math
import statistics

from vitprune.config import configuration
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
