"""The report's numbers and its verdict policy: per-run statistics, configurations, the noise
rules and which comparison may name a winner under which schedule. Imports no torch."""
import json
import math
import statistics
from collections import namedtuple
from dataclasses import dataclass
from typing import NamedTuple, Optional

from vitprune.config import FIELDS, METHODS, applies, configuration
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


def within_run_noise(groups: dict, n: int, mode: str, key=HEADLINE) -> dict:
    """{label: std over states >= 2, averaged over the label's runs}: the noise of retraining one
    ticket, only where states >= 2 retrain the same ticket (POLICY "oneshot")."""
    if mode != "oneshot":
        return {label: None for label in groups}
    stds = {label: [run_stats(r, n, key)["std"] for r in runs] for label, runs in groups.items()}
    return {label: mean([s for s in ss if s is not None]) for label, ss in stds.items()}


# ---- the verdict policy -------------------------------------------------------------------
# What is compared, and when a winner is named:
# - a *cell* = the runs of one dataset and schedule that agree on every field that applies to
#   every method (configuration() without method, seed and the method-only flags); execution
#   flags never split cells. Inside a cell, a configuration = the runs that differ only in seed;
#   its label is the method and the method's own flags that differ in the cell;
# - within a cell the structured methods (Refill, RSST, and RSST/Refill variants) are compared
#   pairwise, Refill vs RSST first; imp and dense are reference columns, never contestants. Cells
#   are never compared with each other (a ratio sweep compares the methods at each ratio);
# - a comparison is a PAIRED t-test on the per-seed differences over the seeds both
#   configurations have (two runs of one seed share State 0, the val split and the data order):
#   mean Δ with its 95% t-interval. A report makes many tests (pairs × cells × states), so the
#   p-values are Holm-corrected over all of them, and a winner needs Holm p < 0.05;
# - any "best state" is chosen by VALIDATION accuracy (over states >= 1) and reported with its test
#   accuracy: a maximum over noisy test scores would select on the test set;
# - oneshot with rewinding: every state >= 2 retrains the same ticket for every method (same
#   keep set, no RSST targets), so only State 1 can tell the methods apart; states >= 2 carry no
#   winner and their spread is the within-run noise. With --rewind=none each method carries its
#   own weights into states >= 2, so they are compared one by one, like geometric states;
# - geometric: every state has its own sparsity: no within-run noise; compared state by state;
# - one seed in common: no seed-level verdict. Under oneshot (rewinding) a gap beyond 2·√2·σ
#   (σ the larger within-run std; the difference of two single values has std √2·σ) is named
#   as "beyond within-run noise", never as a seed-to-seed result; otherwise no verdict;
# - an RSST state whose targets (the largest group's norm ratio; the aggregate for old records)
#   kept more than NOT_ZEROED at the hard prune is flagged wherever the report shows that state.
# POLICY: what each row of the comparison (a run_stats key) may conclude, per mode (see `mode`):
# "compare" (a winner can be named), or the reason none can.
_FINE_TUNE = "– (states carry each method's own weights: see state by state)"
POLICY = {
    "oneshot": {"state0": "– (dense: the same recipe for every method)", "state1": "compare",
                "best": "– (states ≥ 2: same ticket, retrained)", "mean": "– (same ticket, retrained)",
                "std": "– (within-run noise)", "retention": "– (states ≥ 2: same ticket, retrained)",
                "late": "– (same ticket, retrained)", "last": "– (same ticket, retrained)"},
    "geometric": {"state0": "– (dense: the same recipe for every method)", "state1": "compare",
                  "best": "– (states differ in sparsity)", "mean": "– (states differ in sparsity)",
                  "std": "– (states differ in sparsity: not noise)", "retention": "– (states differ in sparsity)",
                  "late": "– (states differ in sparsity)", "last": "compare"},
    "oneshot, no rewind": {"state0": "– (dense: the same recipe for every method)", "state1": "compare",
                           "best": _FINE_TUNE, "mean": _FINE_TUNE, "std": "– (not noise: states differ)",
                           "retention": _FINE_TUNE, "late": _FINE_TUNE, "last": "compare"},
}
ALPHA = 0.05
CONTESTANTS = ("refill", "rsst")  # imp and dense are reference columns

Paired = namedtuple("Paired", "delta low high p n")


def mode(schedule: str, rewind: str) -> str:
    """The POLICY that fits: without rewinding, oneshot states >= 2 are not the same experiment."""
    return "oneshot, no rewind" if schedule == "oneshot" and rewind == "none" else schedule


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


def cell_key(config: dict) -> tuple:
    """What every method of a cell shares: the configuration without method, seed and the flags
    that apply to some methods only."""
    return tuple(sorted((k, json.dumps(v)) for k, v in configuration(config).items()
                        if k != "method" and "method" not in FIELDS[k].metadata["requires"]))


@dataclass(eq=False)
class Cell:
    """The runs of one cell, as configurations {label: [runs]}, compared over n common states."""
    name: str
    groups: dict
    n: int
    mode: str

    def pairs(self) -> list:
        """(a, b) pairs of contestants, Refill before RSST; Δ is b − a."""
        order = lambda label: (METHODS.index(self.groups[label][0].config.get("method", "dense")), label)
        labels = sorted((k for k, runs in self.groups.items() if runs[0].config.get("method") in CONTESTANTS),
                        key=order)
        return [(a, b) for i, a in enumerate(labels) for b in labels[i + 1:]]

    def tested_states(self) -> list:
        return list(range(1, min(self.n, 2) if self.mode == "oneshot" else self.n))

    def values(self, label, state, key=HEADLINE) -> dict:
        return {r.config.get("seed"): r.states[state][key] for r in self.groups[label]}


def cells(runs) -> list:
    """The cells of the runs of one dataset and schedule, named by what sets them apart."""
    by_key = {}
    for r in runs:
        by_key.setdefault(cell_key(r.config), []).append(r)
    differing = [k for k in dict.fromkeys(f for key in by_key for f, _ in key)
                 if len({dict(key).get(k) for key in by_key}) > 1]
    result = []
    for key, members in by_key.items():
        fields = dict(key)
        name = ", ".join(f"{k}={json.loads(fields[k])}" for k in differing if k in fields)
        rewind = members[0].config.get("rewind", FIELDS["rewind"].default)
        result.append(Cell(name, configurations(members), min(len(r.states) for r in members),
                           mode(members[0].config.get("schedule", "oneshot"), rewind)))
    return result


class Verdicts:
    """Every paired test a report makes, Holm-corrected together before any verdict is written:
    the cells' tests and `extra` ({key: p}: the equal-compute comparisons)."""

    def __init__(self, all_cells, extra: dict = None):
        self.tests = {(cell, a, b, s): paired_test(cell.values(b, s), cell.values(a, s))
                      for cell in all_cells for a, b in cell.pairs() for s in cell.tested_states()}
        ps = {k: t.p for k, t in self.tests.items() if t.p is not None}
        self.holm = holm({**ps, **{k: p for k, p in (extra or {}).items() if p is not None}})
        self.noise = {cell: within_run_noise(cell.groups, cell.n, cell.mode) for cell in all_cells}

    def __len__(self):
        return len(self.holm)

    def verdict(self, cell, a, b, state):
        """(Δ b − a or None, its text with the interval, the verdict) at one state."""
        key = (cell, a, b, state)
        if key not in self.tests:
            return None, "n/a", "–"
        t = self.tests[key]
        text = "n/a" if t.delta is None else f"{t.delta:+.2f}" + (
            "" if t.p is None else f" [{t.low:+.2f}, {t.high:+.2f}]")  # no spread: no interval to show
        return t.delta, text, decide(t, self.holm.get(key), self.noise[cell], cell.mode, a, b)


def decide(t: Paired, p_holm, noise: dict, mode: str, a: str, b: str) -> str:
    """The verdict of the paired test t of b against a (Δ = b − a), as the policy above says."""
    winner = b if (t.delta or 0) > 0 else a
    if t.n == 0:
        return "no verdict: no seed in common"
    if t.n >= 2:
        if t.p is None:
            return "n/a (no seed variance)"
        seeds = f"paired over {t.n} seeds"
        if p_holm < ALPHA:
            return f"**{winner}** (Holm p={p_holm:.3f}, p={t.p:.3f}; {seeds})"
        return f"within noise (Holm p={p_holm:.2f}, p={t.p:.2f}; {seeds})"
    if mode != "oneshot":
        return f"no verdict: one seed, and no within-run noise under {mode} (run several seeds)"
    if noise.get(a) is None or noise.get(b) is None:
        return "no verdict: one seed, and within-run noise needs >= 4 states"
    bar = 2 * math.sqrt(2) * max(noise[a], noise[b])
    if abs(t.delta) > bar:
        return f"**{winner}** beyond within-run noise (2√2σ = {bar:.2f}; one seed: not a seed-to-seed result)"
    return f"within noise (2√2σ = {bar:.2f}, within-run; one seed)"


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
#   corrected together with every other test of the report, a winner named at p < 0.05.
COMPUTE = "train_flops"
EQUAL_COMPUTE = 0.10
LOOP_SHAPE = ("method", "states", "epochs", "pruned_epochs", "rewind", "schedule")



def has_compute(run: RunRecords) -> bool:
    return bool(run.states) and all(s.get(COMPUTE) is not None for s in run.states)


def is_finetune(config: dict) -> bool:
    """Prune-and-fine-tune: refill pruning once after State 0, one state trained from its weights."""
    return config.get("method") == "refill" and config.get("states") == 2 and config.get("rewind") == "none"


def compute_cell_key(config: dict) -> tuple:
    """What a run computes, apart from the shape of its loop and its seed (see above)."""
    return tuple(sorted((k, str(v)) for k, v in configuration(config).items()
                        if k not in LOOP_SHAPE and applies(k, {**config, "method": "refill"})))


def compute_cells(runs) -> list:
    """[(title, runs with train_flops, runs without)] per cell, in the order of the runs."""
    cells = {}
    for r in runs:
        cells.setdefault(compute_cell_key(r.config), []).append(r)
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


def equal_compute_keys(rows: list) -> dict:
    """{key: p} of the equal-compute rows, for Verdicts' Holm family."""
    return {("equal compute", i): row.test.p for i, row in enumerate(rows)}


def equal_compute_verdicts(rows: list, adjusted: dict = None) -> list:
    """The rows with their verdicts, Holm-adjusted p from `adjusted` (Verdicts.holm: every test
    of the report; default: the rows' own tests as the family)."""
    adjusted = holm({k: p for k, p in equal_compute_keys(rows).items() if p is not None}) if adjusted is None else adjusted
    return [row._replace(verdict=_equal_verdict(row, adjusted.get(("equal compute", i))))
            for i, row in enumerate(rows)]


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
