"""The compute analysis: accuracy per training FLOP, the four ways of retraining a ticket as
configurations of the loop, the equal-compute verdicts between them and the --pruned_epochs of
equal compute; the numbers of the compute tables and figures. Imports no torch."""
import math
from typing import NamedTuple, Optional

from vitprune.config import complete
from vitprune.report.identity import OWN, STRATEGIES, identity, pair_by_seed, retraining, strategy
from vitprune.report.policy import CONTESTANTS, differing, significance
from vitprune.report.runs import HEADLINE, RunRecords
from vitprune.report.stats import Paired, Summary, holm, mean, paired_test, run_stats, std, summarize

# Records written since compute accounting carry, in every epoch and state record, the training
# FLOPs (`train_flops`) and wall seconds (`train_time_s`) of the run so far. Older records have
# neither: their runs get no compute figure and no equal-compute verdict, and the report says so.
# - the four ways of retraining a ticket (identity.STRATEGIES) are configurations of the loop:
#   weight rewinding (--rewind=init|epoch:K: the ticket loop), learning-rate rewinding
#   (--rewind=none: the trained weights, the LR schedule replayed; Renda et al. 2020), fine-tuning
#   (--rewind=none --retrain_lr: the trained weights at a constant LR) and scratch (--rewind=random:
#   the ticket's structure from a fresh init; Liu et al. 2019's Scratch-E/B);
# - a cell is the set of runs that agree on everything except the shape of the loop (SHAPE: method,
#   states, epochs, pruned_epochs, retraining, schedule), the methods' own flags and the seed;
# - a run's result is its best pruned state by validation accuracy (its test accuracy), charged
#   with the compute of the whole run: choosing a state by val needs every state trained;
# - equal compute: two runs of one seed, their splits agreeing, whose total training FLOPs are
#   within EQUAL_COMPUTE (10%) of each other; every pair of configurations that retrain
#   differently (each configuration against the closest in compute of every later strategy) gets
#   a paired t-test over those seeds, Holm-corrected with every other test of the report.
COMPUTE = "train_flops"
EQUAL_COMPUTE = 0.10
SHAPE = ("method", "states", "epochs", "pruned_epochs", "retraining", "schedule")


def has_compute(run: RunRecords) -> bool:
    return bool(run.states) and all(s.get(COMPUTE) is not None for s in run.states)


def compute_cell_key(config: dict, recorded: dict = None) -> tuple:
    """What a run computes, apart from the shape of its loop, its method's own flags and its seed."""
    what = identity({**config, "method": "refill"}, recorded or {})  # every structured flag, RSST's too
    return tuple(sorted((k, str(v)) for k, v in what.items() if k not in SHAPE and k not in OWN))


def compute_cells(runs) -> list:
    """[(title, runs with train_flops, runs without)] per cell, in the order of the runs."""
    cells = {}
    for r in runs:
        cells.setdefault(compute_cell_key(r.config, r.resolved), []).append(r)
    keys = [dict(k) for k in cells]
    shown = ["dataset", "model", "ratio"] + [k for k in differing(keys) if k not in ("dataset", "model", "ratio")]
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


def ticket_epoch_flops(run: RunRecords) -> Optional[float]:
    """The training FLOPs of one epoch of the run's final, pruned network as a one-state retraining
    trains it, teacher included: its last state record's `ticket_epoch_flops`. Older records: State
    0's images per epoch (its train_flops / (epochs × 3 × flops_total), forward and backward of the
    dense network) × (3 × the last state's flops_alive + under --distill the teacher's forward, the
    dense model's: a pruned teacher from a state dict costs less). None where a count is missing."""
    first, last = run.states[0], run.states[-1]
    if last.get("ticket_epoch_flops"):
        return last["ticket_epoch_flops"]
    if None in (first.get(COMPUTE), first.get("flops_total"), last.get("flops_alive")):
        return None
    c = complete(run.config)
    images = first[COMPUTE] / (c["epochs"] * 3 * first["flops_total"])
    return images * (3 * last["flops_alive"] + (first["flops_total"] if c["distill"] != "none" else 0))


def matching_pruned_epochs(run: RunRecords) -> Optional[float]:
    """--pruned_epochs of the 2-state retraining (any strategy) whose training compute equals this
    run's: what it spent after State 0 over the per-epoch cost of training its final ticket, from
    its records, whatever the loop's shape (RSST's targets, geometric states, --reg_reach, a
    teacher). None without compute or pruned state."""
    per_epoch = ticket_epoch_flops(run) if has_compute(run) and len(run.states) >= 2 else None
    return (run.states[-1][COMPUTE] - run.states[0][COMPUTE]) / per_epoch if per_epoch else None


class EqualCompute(NamedTuple):
    """Two configurations of one cell that retrain differently, at equal compute; Δ = a − b."""
    a: str
    b: str
    ratio: Optional[float]   # b / a training FLOPs, mean over the paired seeds
    a_acc: dict              # {seed: accuracy} of the seeds at equal compute
    b_acc: dict
    a_summary: Summary       # over those seeds
    b_summary: Summary
    test: Paired
    verdict: str
    pairing: tuple           # the runs paired by seed, those refused (identity.pair_by_seed)


def shape_label(config: dict) -> str:
    """A configuration of a cell by the shape of its loop and its retraining: 'refill loop, 16 × 60
    epochs' (weight rewinding: the ticket loop), 'refill learning-rate rewinding, 60 + 900 epochs',
    'refill fine-tuning at lr=final, 60 + 900 epochs', 'refill scratch, 60 + 900 epochs'."""
    c = complete(config)
    epochs, later, states, how = c["epochs"], c["pruned_epochs"] or c["epochs"], c["states"], retraining(c)
    span = f"{states} × {epochs} epochs" + (f" (states ≥ 1: {later})" if later != epochs else "")
    if strategy(c) == "weight rewinding":
        text = f"{c['method']} loop, {span}" + ("" if how == "weight rewinding to init" else f", {how}")
    else:
        text = f"{c['method']} {how}, " + (f"{epochs} + {later} epochs" if states == 2 else span)
    return text + ("" if c["schedule"] == "oneshot" else f", {c['schedule']}")


def cell_groups(cell_runs) -> dict:
    """{label: [runs]} of one cell's configurations, labelled by shape_label and what else differs."""
    key = lambda r: tuple(sorted((k, str(v)) for k, v in r.identity.items()))
    keys = [dict(k) for k in dict.fromkeys(key(r) for r in cell_runs)]
    differing = [k for k in dict.fromkeys(f for c in keys for f in c)
                 if k not in SHAPE and len({c[k] for c in keys if k in c}) > 1]
    groups = {}
    for r in cell_runs:
        c = dict(key(r))
        label = " ".join([shape_label(r.config)] + [f"{k}={c[k]}" for k in differing if k in c])
        groups.setdefault(label, []).append(r)
    return groups


def equal_compute(cell_runs) -> list:
    """An EqualCompute per pair of a cell's refill/rsst configurations that retrain differently:
    each configuration against the closest in compute of every later strategy (STRATEGIES' order);
    verdicts not yet drawn."""
    groups = cell_groups(cell_runs)
    of = {s: {k: g for k, g in groups.items() if strategy(g[0].config) == s and g[0].config.get("method") in
              CONTESTANTS} for s in STRATEGIES}
    rows = []
    for i, first in enumerate(STRATEGIES):
        for second in STRATEGIES[i + 1:]:
            for label, runs in of[first].items():
                pairs = {b: _pairs(runs, other) for b, other in of[second].items()}
                if pairs:
                    distance = lambda k: abs(math.log(pairs[k][1])) if pairs[k][1] else math.inf  # in compute
                    b = max(pairs, key=lambda k: (len(pairs[k][0]), -distance(k)))
                    rows.append(_row(label, b, *pairs[b]))
    return rows


def _row(a, b, within, ratio, pairing) -> EqualCompute:
    a_acc, b_acc = {s: x for s, (x, _) in within.items()}, {s: y for s, (_, y) in within.items()}
    return EqualCompute(a, b, ratio, a_acc, b_acc, summarize(list(a_acc.values())), summarize(list(b_acc.values())),
                        paired_test(a_acc, b_acc), "", pairing)


def _pairs(runs_a, runs_b):
    """({seed: (acc of a, acc of b)} of the seeds at equal compute, the mean FLOPs ratio b / a over
    the seeds paired (None if none), the pairing by seed)."""
    pairing = pair_by_seed([r for r in runs_a if run_result(r)], [r for r in runs_b if run_result(r)])
    results = {s: (run_result(ra), run_result(rb)) for s, (ra, rb) in pairing[0].items()}
    ratios = {s: b[1] / a[1] for s, (a, b) in results.items()}
    within = {s: (a[0], b[0]) for s, (a, b) in results.items() if abs(ratios[s] - 1) <= EQUAL_COMPUTE}
    return within, mean(list(ratios.values())), pairing


def equal_compute_keys(rows: list) -> dict:
    """{key: p} of the equal-compute rows, for Verdicts' Holm family."""
    return {("equal compute", i): row.test.p for i, row in enumerate(rows)}


def equal_compute_verdicts(rows: list, adjusted: dict = None) -> list:
    """The rows with their verdicts, Holm-adjusted p from `adjusted` (Verdicts.holm: every test
    of the report; default: the rows' own tests as the family)."""
    adjusted = holm({k: p for k, p in equal_compute_keys(rows).items() if p is not None}) if adjusted is None else adjusted
    return [row._replace(verdict=_equal_verdict(row, adjusted.get(("equal compute", i)), len(adjusted)))
            for i, row in enumerate(rows)]


def _equal_verdict(row: EqualCompute, p_holm, family: int) -> str:
    t = row.test
    if t.n == 0:
        near = "" if row.ratio is None else f" (B / A = {row.ratio:.2f})"
        return f"no verdict: no seed whose two runs' compute lie within ±{EQUAL_COMPUTE:.0%}{near}"
    if t.n == 1:
        return "no verdict: one seed at equal compute (run several seeds)"
    if t.p is None:
        return "n/a (no seed variance)"
    return significance(row.a if t.delta > 0 else row.b, p_holm, t.p, family, f"paired over {t.n} seeds")


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


# ---- what a compute cell shows --------------------------------------------------------------------

class Spent(NamedTuple):
    """One configuration of a compute cell: its runs' training compute and time, and their result."""
    label: str
    runs: int
    flops: float                    # mean training FLOPs of a whole run
    seconds: Optional[float]        # mean training time of the runs that logged it
    acc: Summary                    # best pruned test accuracy (by val), over its runs
    pruned_epochs: Optional[float]  # mean --pruned_epochs of the 2-state retraining of equal compute


def spent(cell_runs) -> list:
    """A Spent per configuration of a cell's runs (every one with train_flops)."""
    rows = []
    for label, group in cell_groups(cell_runs).items():
        results = [run_result(r) for r in group]
        seconds = [r.states[-1].get("train_time_s") for r in group if r.states[-1].get("train_time_s")]
        matching = [m for m in map(matching_pruned_epochs, group) if m is not None]
        rows.append(Spent(label, len(group), mean([r.states[-1][COMPUTE] for r in group]), mean(seconds),
                          summarize([x[0] for x in results if x]), mean(matching)))
    return rows


class Curve(NamedTuple):
    """A configuration's final pruned test accuracy against the cumulative training FLOPs at the end
    of each state its runs have in common: means over the runs, their std (0: one run) as error."""
    label: str
    strategy: str  # how it retrains (identity.STRATEGIES): the figure draws each its own way
    runs: int
    flops: list
    acc: list
    err: list


def curves(cell_runs) -> list:
    """A Curve per configuration of a cell's runs (every one with train_flops)."""
    out = []
    for label, runs in cell_groups(cell_runs).items():
        n = min(len(r.states) for r in runs)
        out.append(Curve(label, strategy(runs[0].config), len(runs),
                         [mean([r.states[s][COMPUTE] for r in runs]) for s in range(n)],
                         [mean([r.states[s][HEADLINE] for r in runs]) for s in range(n)],
                         [std([r.states[s][HEADLINE] for r in runs]) or 0.0 for s in range(n)]))
    return out
