"""The verdict policy: configurations and cells (what is compared with what), what each row of a
comparison may conclude under which schedule, and the verdicts of a report's paired tests,
Holm-corrected together. Imports no torch."""
import json
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

from vitprune.config import FIELDS, METHODS, configuration
from vitprune.report.runs import HEADLINE
from vitprune.report.stats import Paired, holm, mean, paired_test, run_stats


def configurations(runs) -> dict:
    """{label: [runs]} for the runs of one dataset; label = method (+ what else differs and
    applies to the run's method). The runs keep their own labels (cells() gives them)."""
    key = lambda r: tuple(sorted((k, str(v)) for k, v in configuration(r.config).items()))
    keys = [dict(k) for k in dict.fromkeys(key(r) for r in runs)]
    differing = [k for k in dict.fromkeys(f for c in keys for f in c)
                 if k != "method" and len({c[k] for c in keys if k in c}) > 1]
    groups = {}
    for r in runs:
        c = dict(key(r))
        label = " ".join([c.get("method", "?")] + [f"{k}={c[k]}" for k in differing if k in c])
        groups.setdefault(label, []).append(r)
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
# METRICS: the rows of a comparison (run_stats keys), in the order the tables show them;
# POLICY: what each row may conclude, per mode (see `mode`): "compare" (a winner can be named),
# or the reason none can.
METRICS = ("state0", "state1", "best", "mean", "std", "retention", "late", "last")
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


def mode(schedule: str, rewind: str) -> str:
    """The POLICY that fits: without rewinding, oneshot states >= 2 are not the same experiment."""
    return "oneshot, no rewind" if schedule == "oneshot" and rewind == "none" else schedule


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
        groups = configurations(members)
        for label, group in groups.items():  # a run is named by its cell's column in every table and plot
            for r in group:
                r.label = label
        result.append(Cell(name, groups, min(len(r.states) for r in members),
                           mode(members[0].config.get("schedule", "oneshot"), rewind)))
    return result


class Judged(NamedTuple):
    """A pair of configurations at one row: the paired test of b against a (None where the row
    names no winner) and the verdict, or why there is none."""
    test: Optional[Paired]
    verdict: str


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

    def verdict(self, cell, a, b, state) -> Judged:
        """The test of b against a (Δ = b − a) at one state, and its verdict."""
        key = (cell, a, b, state)
        if key not in self.tests:
            return Judged(None, "–")
        t = self.tests[key]
        return Judged(t, decide(t, self.holm.get(key), self.noise[cell], cell.mode, a, b))


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

