"""The compute analysis: accuracy per training FLOP, prune-and-fine-tune as a configuration of the
loop, and the equal-compute verdict; the numbers of the compute tables and figures. Imports no torch."""
import math
from typing import NamedTuple, Optional

from vitprune.config import applies, configuration
from vitprune.report.policy import ALPHA
from vitprune.report.runs import HEADLINE, RunRecords
from vitprune.report.stats import Paired, Summary, holm, mean, paired_test, run_stats, std, summarize

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
    loop_summary: Summary    # over those seeds
    finetune_summary: Summary
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
        rows.append(EqualCompute(label, f, ratio, loop_acc, ft_acc, summarize(list(loop_acc.values())),
                                 summarize(list(ft_acc.values())), paired_test(loop_acc, ft_acc), ""))
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


# ---- what a compute cell shows --------------------------------------------------------------------

class Spent(NamedTuple):
    """One configuration of a compute cell: its runs' training compute and time, and their result."""
    label: str
    runs: int
    flops: float                    # mean training FLOPs of a whole run
    seconds: Optional[float]        # mean training time of the runs that logged it
    acc: Summary                    # best pruned test accuracy (by val), over its runs
    pruned_epochs: Optional[float]  # mean --pruned_epochs of the prune-and-fine-tune of equal compute


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
    runs: int
    flops: list
    acc: list
    err: list


def curves(cell_runs) -> list:
    """A Curve per configuration of a cell's runs (every one with train_flops)."""
    out = []
    for label, runs in cell_groups(cell_runs).items():
        n = min(len(r.states) for r in runs)
        out.append(Curve(label, len(runs), [mean([r.states[s][COMPUTE] for r in runs]) for s in range(n)],
                         [mean([r.states[s][HEADLINE] for r in runs]) for s in range(n)],
                         [std([r.states[s][HEADLINE] for r in runs]) or 0.0 for s in range(n)]))
    return out
