"""The report's statistics: a run's own numbers (its best state by val, spans of states, state 0's
trend, its times), summaries over seeds, the paired t-test and Holm's correction. Imports no torch."""
import math
import statistics
from collections import namedtuple
from typing import NamedTuple, Optional

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


class Summary(NamedTuple):
    """One metric over a configuration's seeds: how many values, their mean and (2+) std."""
    n: int
    mean: Optional[float]
    std: Optional[float]
    state: Optional[int] = None  # the state the value is from, where it is a best state


def summarize(values, state=None) -> Summary:
    return Summary(len(values), mean(values), std(values), state)


class Trend(NamedTuple):
    """State 0's val accuracy: the means of its first k epochs, its last k and the k before."""
    k: int
    first: float
    last: float
    before: float
    rising: bool  # the last k beat the k before by more than RISING


def state0_trend(run: RunRecords) -> Optional[Trend]:
    """Whether state 0 was still improving when it stopped, k = min(5, epochs/2); None below 2 epochs."""
    v = run.state_epochs(0)
    k = min(5, len(v) // 2)
    if not k:
        return None
    first, last, before = mean(v[:k]), mean(v[-k:]), mean(v[-2 * k:-k])
    return Trend(k, first, last, before, last - before > RISING)


class Times(NamedTuple):
    """A run's training time in seconds (None = n/a)."""
    state0: float
    state1: Optional[float]
    later: Optional[float]      # mean per state over states 2+
    total: float
    per_epoch: Optional[float]  # mean over the epochs that logged their time


def run_times(run: RunRecords) -> Times:
    t = [s.get("time_s", 0.0) for s in run.states]
    return Times(t[0], t[1] if len(t) > 1 else None, mean(t[2:]), sum(t),
                 mean([e["time_s"] for e in run.epochs if e.get("time_s") is not None]))


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


def one_seed_z(delta: float, sigma: float):
    """(z, two-sided normal p) of a one-seed gap Δ whose noise is the difference of two single
    values of within-run std σ: z = Δ / (√2·σ). z = 2 is the old 2√2σ bar (p = 0.046)."""
    z = abs(delta) / (math.sqrt(2) * sigma)
    return z, math.erfc(z / math.sqrt(2))


def holm(ps: dict) -> dict:
    """Holm's step-down adjusted p-values for {test: p}: controls the chance of any false winner."""
    adjusted, running = {}, 0.0
    for i, k in enumerate(sorted(ps, key=ps.get)):
        running = max(running, min(1.0, (len(ps) - i) * ps[k]))
        adjusted[k] = running
    return adjusted
