"""The report's numbers, computed before a line of it is written: per dataset and schedule its runs'
own numbers and its cells' tables with their verdicts; per compute cell what each configuration
spent and the equal-compute verdicts; every paired test Holm-corrected together. Imports no torch."""
from dataclasses import dataclass
from typing import NamedTuple, Optional

from vitprune.report.compute import (compute_cells, compute_to_reach, curves, equal_compute, equal_compute_keys,
                                     equal_compute_verdicts, has_compute, spent)
from vitprune.report.policy import METRICS, POLICY, Cell, Judged, Verdicts, cells, configurations, split_by
from vitprune.report.runs import BEST_EPOCH, HEADLINE, RunRecords
from vitprune.report.stats import Times, Trend, late_start, run_stats, run_times, state0_trend, summarize


class Row(NamedTuple):
    """A row of a cell's table: per configuration its Summary and whether it shows a state whose
    RSST targets were not driven to zero; per pair of contestants its Judged."""
    metric: object                # a run_stats key; in the state-by-state table, the state
    values: dict                  # {label: Summary}
    flagged: dict                 # {label: bool}
    pairs: list                   # [Judged], in the order of the cell's pairs
    reach: Optional[dict] = None  # {label: mean training FLOPs to reach the row's state}; None: no compute


@dataclass(eq=False)
class CellTables:
    """A cell's numbers: its comparison rows per headline (final pruned, best epoch), state by state."""
    name: str
    mode: str
    n: int          # the states its runs have in common
    late: int       # the first state of its late phase
    labels: list    # its configurations, in the columns' order
    pairs: list     # [(a, b)]: the contestants compared, Δ = b − a
    tables: dict    # {HEADLINE: [Row], BEST_EPOCH: [Row]}, rows in METRICS' order
    by_state: list  # [Row] of states 1..n-1, final pruned test accuracy
    compute: bool   # every run has train_flops: the rows carry `reach`


class RunNumbers(NamedTuple):
    """A run's own numbers in its section."""
    run: RunRecords
    own: dict                # run_stats over all its states
    common: dict             # run_stats over the states every run of the section has
    trend: Optional[Trend]   # state 0's val accuracy over its epochs
    times: Times


@dataclass(eq=False)
class Section:
    """The runs of one dataset and schedule: their numbers, their cells, their RSST configurations."""
    dataset: str
    schedule: str
    several: bool   # the dataset has sections of other schedules: the title and file names say which
    title: str
    n: int          # the states every run of the section has
    runs: list      # [RunNumbers], in the report's order
    cells: list     # [CellTables]
    rsst: dict      # {label: [runs]}: the RSST configurations whose records hold its diagnostics


class ComputeCell(NamedTuple):
    """A compute cell (same model, data, ratio): its runs, what each configuration spent, its
    accuracy-vs-compute curves and its equal-compute verdicts (Holm over the whole report)."""
    title: str
    runs: list      # the runs with train_flops
    without: list   # the runs whose records have none: no figure, no verdict
    spent: list     # [Spent]
    curves: list    # [Curve]
    equal: list     # [EqualCompute], judged


@dataclass(eq=False)
class Analysis:
    """What a report shows, computed."""
    sections: list    # [Section]
    compute: list     # [ComputeCell]
    tests: int        # the paired tests Holm-corrected together
    one_seed: int     # of them, one-seed comparisons against the within-run noise
    split_by: list    # the fields that split the cells shown
    refused: list     # [(seed, run name, run name)]: runs of one seed not paired, their splits differ
    unverified: list  # the names of runs paired without a split fingerprint (older records)


def analyse(runs) -> Analysis:
    """Every number the report shows; all its paired tests are made, and Holm-corrected together,
    before any verdict is drawn."""
    section_of = lambda r: (r.config.get("dataset"), r.config.get("schedule", "oneshot"))
    members = {key: [r for r in runs if section_of(r) == key] for key in dict.fromkeys(map(section_of, runs))}
    section_cells = {key: cells(subset) for key, subset in members.items()}
    by_compute = compute_cells(runs)  # the equal-compute view: cells whatever the loop's shape
    equal_rows = [equal_compute(with_) for _, with_, _ in by_compute]
    flat = [row for rows in equal_rows for row in rows]
    verdicts = Verdicts([c for cs in section_cells.values() for c in cs], equal_compute_keys(flat))  # Holm over all
    judged = iter(equal_compute_verdicts(flat, verdicts.holm))
    compute = [ComputeCell(title, with_, without, spent(with_), curves(with_), [next(judged) for _ in rows])
               for (title, with_, without), rows in zip(by_compute, equal_rows)]
    sections = []
    for (dataset, schedule), subset in members.items():
        several = sum(d == dataset for d, _ in members) > 1
        sections.append(section(dataset, schedule, subset, section_cells[(dataset, schedule)], verdicts, several))
    split = list(dict.fromkeys(k for subset in members.values() for k in split_by(subset)))
    pairings = verdicts.pairings + [row.pairing for row in flat]
    refused = dict.fromkeys((seed, a.name, b.name) for _, no in pairings for seed, a, b in no)
    unverified = dict.fromkeys(r.name for pairs, _ in pairings for rs in pairs.values() for r in rs if r.split is None)
    return Analysis(sections, compute, len(verdicts), verdicts.one_seed, split, list(refused), list(unverified))


def section(dataset, schedule, runs, section_cells, verdicts: Verdicts, several: bool) -> Section:
    n = min(len(r.states) for r in runs)
    rsst = {label: group for label, group in configurations(runs).items()
            if any(e.get("target_norm_ratio") is not None for r in group for e in r.epochs)}
    return Section(dataset, schedule, several, f"{dataset} — {schedule}" if several else dataset, n,
                   [RunNumbers(r, run_stats(r), run_stats(r, n), state0_trend(r), run_times(r)) for r in runs],
                   [cell_tables(c, verdicts) for c in section_cells], rsst)


def cell_tables(cell: Cell, verdicts: Verdicts) -> CellTables:
    compute = all(has_compute(r) for runs in cell.groups.values() for r in runs)  # newer records only
    return CellTables(cell.name, cell.mode, cell.n, late_start(cell.n), list(cell.groups), cell.pairs(),
                      {key: comparison(cell, verdicts, key, compute) for key in (HEADLINE, BEST_EPOCH)},
                      by_state(cell, verdicts), compute)


def comparison(cell: Cell, verdicts: Verdicts, key, compute: bool) -> list:
    """The rows of a comparison table; only the headline's rows carry verdicts; `reach` where `compute`."""
    n, rows = cell.n, []
    stats = {label: [run_stats(r, n, key) for r in runs] for label, runs in cell.groups.items()}
    for metric in METRICS:
        policy = POLICY[cell.mode][metric]
        state = {"state1": 1, "last": n - 1}.get(metric)
        values = {label: summarize([s[metric] for s in ss if s[metric] is not None],
                                   ss[0]["best_state"] if metric == "best" else None) for label, ss in stats.items()}
        flagged = {label: _flagged(cell.groups[label], ss, metric, n) for label, ss in stats.items()}
        pairs = [verdicts.verdict(cell, a, b, state) if policy == "compare" and key == HEADLINE
                 else Judged(None, policy) for a, b in cell.pairs()]
        reach = ({label: compute_to_reach(runs, metric, n, key) for label, runs in cell.groups.items()}
                 if compute else None)
        rows.append(Row(metric, values, flagged, pairs, reach))
    return rows


def _flagged(runs, stats, metric, n) -> bool:
    """Whether a row shows (or averages) a state whose RSST targets were not driven to zero."""
    shown = {"state1": lambda s: [1], "last": lambda s: [n - 1], "best": lambda s: [s["best_state"]],
             "mean": lambda s: range(2, n), "std": lambda s: range(2, n), "late": lambda s: range(late_start(n), n),
             "retention": lambda s: [s["best_state"]]}.get(metric, lambda s: [])
    return any(state is not None and r.not_zeroed(state) for r, s in zip(runs, stats) for state in shown(s))


def by_state(cell: Cell, verdicts: Verdicts) -> list:
    """The rows comparing the configurations state by state (final pruned test accuracy)."""
    rows = []
    for s in range(1, cell.n):
        same = cell.mode == "oneshot" and s >= 2
        groups = cell.groups.items()
        rows.append(Row(s, {label: summarize([r.states[s][HEADLINE] for r in runs]) for label, runs in groups},
                        {label: any(r.not_zeroed(s) for r in runs) for label, runs in groups},
                        [Judged(None, "– (same ticket, retrained)") if same else verdicts.verdict(cell, a, b, s)
                         for a, b in cell.pairs()]))
    return rows
