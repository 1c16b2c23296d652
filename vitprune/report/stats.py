"""The report's statistics: a run's own numbers (its best state by val, spans of states), the
paired t-test and Holm's correction. Imports no torch."""
import math
import statistics
from collections import namedtuple

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


Paired = namedtuple("Paired", "delta low high p n")


def paired_test(a: dict, b: dict) -> Paired:
    """Paired t-test of {seed: value} a against b over the seeds both have: Δ = mean(a − b) with
    its 95% t-interval, two-sided p (None below 2 seeds or when every difference is the same)."""
    seeds = sorted(a.keys() & b.keys(), key=str)
    diffs = [a[s] - b[s] for s in seeds]
    if not diffs:
        return Paired(None, None, None, None, 0)
    delta = mean(diffs)
    if len(diffs) < 2:
        return Paired(delta, None, None, None, len(diffs))
    if statistics.stdev(diffs) == 0:  # every seed moved by the same amount: the interval is the point
        return Paired(delta, delta, delta, None, len(diffs))
    from scipy import stats
    half = stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    p = stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).pvalue
    return Paired(delta, delta - half, delta + half, float(p), len(diffs))


def holm(ps: dict) -> dict:
    """Holm's step-down adjusted p-values for {test: p}: controls the chance of any false winner."""
    adjusted, running = {}, 0.0
    for i, k in enumerate(sorted(ps, key=ps.get)):
        running = max(running, min(1.0, (len(ps) - i) * ps[k]))
        adjusted[k] = running
    return adjusted
