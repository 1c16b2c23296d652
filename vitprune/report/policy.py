"""The verdict policy: configurations and cells (what is compared with what), what each row of a
comparison may conclude under which schedule, and the verdicts of a report's paired tests,
Holm-corrected together. Imports no torch."""
import json
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

from vitprune.config import METHODS
from vitprune.config import complete
from vitprune.report.identity import OWN, pair_by_seed
from vitprune.report.runs import HEADLINE
from vitprune.report.stats import Paired, holm, mean, one_seed_z, paired_test, run_stats


def configurations(runs) -> dict:
    """{label: [runs]} for runs of one dataset; label = method (+ what else of their identity
    differs). The runs keep their own labels (cells() gives them)."""
    key = lambda r: tuple(sorted((k, str(v)) for k, v in r.identity.items()))
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
# - a *cell* = the runs of one dataset and schedule of one identity (identity.py) but for method,
#   seed and a method's own tuning flags (RSST's --reg_*): every flag that sets what is pruned, how
#   much, how the keep set is chosen, the recipe and the retraining splits cells, and so do the
#   numerics the runs resolved (precision, device type, kernel backend, --compile): a bf16 run and
#   an fp32 run are not compared, since their gap may be the numerics'. Inside a cell, a
#   configuration = the runs that differ only in seed; its label is the method and the method's own
#   flags that differ in the cell. imp and dense (references, which have no selection flags) join
#   every cell whose flags they share;
# - within a cell the structured methods (Refill, RSST, and RSST variants) are compared pairwise,
#   Refill vs RSST first; imp and dense are reference columns, never contestants. Cells are never
#   compared with each other (an mlp_ratio sweep compares the methods at each mlp_ratio);
# - a comparison is a PAIRED t-test on the per-seed differences over the seeds both configurations
#   have whose splits agree (split_fingerprint; records without one are paired as before): mean Δ
#   with its raw 95% t-interval. A report makes many tests (pairs × cells × states), so the
#   p-values are Holm-corrected over all of them, and a winner needs Holm p < 0.05. The interval
#   is unadjusted: where it excludes 0 (raw p < 0.05) but Holm does not name a winner, the verdict
#   says "not significant after Holm over N tests";
# - any "best state" is chosen by VALIDATION accuracy (over states >= 1) and reported with its test
#   accuracy: a maximum over noisy test scores would select on the test set;
# - oneshot with rewinding: every state >= 2 retrains the same ticket for every method (same
#   keep set, no RSST targets), so only State 1 can tell the methods apart; states >= 2 carry no
#   winner and their spread is the within-run noise. Without weight rewinding (--rewind=none)
#   each method carries its own weights into states >= 2, so they are compared one by one;
# - geometric: every state has its own sparsity: no within-run noise; compared state by state;
# - one seed in common (oneshot with rewinding): the gap is judged against the within-run noise,
#   z = Δ / (√2·σ) (σ the larger within-run std; the difference of two single values has std
#   √2·σ), with the two-sided normal p of z, which joins the Holm family like any other test:
#   many one-seed cells would otherwise name chance winners. A winner is named "beyond within-run
#   noise", never as a seed-to-seed result;
# - an RSST state whose targets (the largest group's norm ratio; the aggregate for old records)
#   kept more than NOT_ZEROED at the hard prune is flagged wherever the report shows that state.
# METRICS: the rows of a comparison (run_stats keys), in the order the tables show them;
# POLICY: what each row may conclude, per mode (see `mode`): "compare" (a winner can be named),
# or the reason none can.
NO_REWIND = "oneshot, no weight rewinding"
METRICS = ("state0", "state1", "best", "mean", "std", "retention", "late", "last")
_CARRIED = "– (states carry each method's own weights: see state by state)"
POLICY = {
    "oneshot": {"state0": "– (dense: the same recipe for every method)", "state1": "compare",
                "best": "– (states ≥ 2: same ticket, retrained)", "mean": "– (same ticket, retrained)",
                "std": "– (within-run noise)", "retention": "– (states ≥ 2: same ticket, retrained)",
                "late": "– (same ticket, retrained)", "last": "– (same ticket, retrained)"},
    "geometric": {"state0": "– (dense: the same recipe for every method)", "state1": "compare",
                  "best": "– (states differ in sparsity)", "mean": "– (states differ in sparsity)",
                  "std": "– (states differ in sparsity: not noise)", "retention": "– (states differ in sparsity)",
                  "late": "– (states differ in sparsity)", "last": "compare"},
    NO_REWIND: {"state0": "– (dense: the same recipe for every method)", "state1": "compare",
                "best": _CARRIED, "mean": _CARRIED, "std": "– (not noise: states differ)",
                "retention": _CARRIED, "late": _CARRIED, "last": "compare"},
}
ALPHA = 0.05
CONTESTANTS = ("refill", "rsst")  # imp and dense are reference columns


def mode(schedule: str, rewind: str) -> str:
    """The POLICY that fits: without rewinding, oneshot states >= 2 are not the same experiment."""
    return NO_REWIND if schedule == "oneshot" and rewind == "none" else schedule


def cell_key(run) -> tuple:
    """What every method of a cell shares: the run's identity without method and the methods' own
    tuning flags; values as JSON."""
    return tuple(sorted((k, json.dumps(v)) for k, v in run.identity.items() if k != "method" and k not in OWN))


def differing(keys) -> list:
    """The fields whose values differ among the keys ({field: value} each; a missing field counts)."""
    return [k for k in dict.fromkeys(f for key in keys for f in key) if len({key.get(k) for key in keys}) > 1]


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

    def paired(self, a, b, state, key=HEADLINE):
        """({seed: value} of a, of b) over the seeds both have whose splits agree."""
        pairs, _ = pair_by_seed(self.groups[a], self.groups[b])
        return ({s: ra.states[state][key] for s, (ra, _) in pairs.items()},
                {s: rb.states[state][key] for s, (_, rb) in pairs.items()})


def cells(runs) -> list:
    """The cells of the runs of one dataset and schedule, named by what sets them apart. A
    reference run (imp, dense) joins every contestants' cell whose flags it shares."""
    contest = dict.fromkeys(cell_key(r) for r in runs if r.config.get("method") in CONTESTANTS)
    by_key = {}
    for r in runs:
        key = cell_key(r)
        homes = [key] if key in contest else [k for k in contest if set(key) <= set(k)] or [key]
        for k in homes:
            by_key.setdefault(k, []).append(r)
    fields = [dict(key) for key in by_key]
    split = differing(fields)
    result = []
    for key, members in zip(fields, by_key.values()):
        name = ", ".join(f"{k}={json.loads(key[k])}" for k in split if k in key)
        groups = configurations(members)
        for label, group in groups.items():  # a run is named by its cell's column in every table and plot
            for r in group:
                r.label = label
        first = complete(members[0].config)
        result.append(Cell(name, groups, min(len(r.states) for r in members), mode(first["schedule"], first["rewind"])))
    return result


def split_by(runs) -> list:
    """The fields that split these runs (one dataset and schedule) into cells."""
    return differing([dict(k) for k in dict.fromkeys(cell_key(r) for r in runs
                                                     if r.config.get("method") in CONTESTANTS)])


class Judged(NamedTuple):
    """A pair of configurations at one row: the paired test of b against a (None where the row
    names no winner) and the verdict, or why there is none."""
    test: Optional[Paired]
    verdict: str


class Verdicts:
    """Every paired test a report makes, Holm-corrected together before any verdict is written:
    the cells' tests (one-seed ones against the within-run noise) and `extra` ({key: p}: the
    equal-compute comparisons). `pairings`: per pair of configurations, the runs paired by seed
    and those refused (identity.pair_by_seed)."""

    def __init__(self, all_cells, extra: dict = None):
        self.tests = {(cell, a, b, s): paired_test(*reversed(cell.paired(a, b, s)))
                      for cell in all_cells for a, b in cell.pairs() for s in cell.tested_states()}
        self.noise = {cell: within_run_noise(cell.groups, cell.n, cell.mode) for cell in all_cells}
        ps = {k: self.p(k) for k in self.tests}
        self.one_seed = sum(p is not None and self.tests[k].n == 1 for k, p in ps.items())
        self.holm = holm({k: p for k, p in {**ps, **(extra or {})}.items() if p is not None})
        self.pairings = [pair_by_seed(cell.groups[a], cell.groups[b]) for cell in all_cells for a, b in cell.pairs()]

    def __len__(self):
        return len(self.holm)

    def p(self, key):
        """The test's p: the paired t-test's, or for one seed the normal p against the within-run noise."""
        t, (cell, a, b, _) = self.tests[key], key
        if t.n != 1:
            return t.p
        sigma = one_seed_sigma(self.noise[cell], a, b)
        return None if not sigma else one_seed_z(t.delta, sigma)[1]

    def verdict(self, cell, a, b, state) -> Judged:
        """The test of b against a (Δ = b − a) at one state, and its verdict."""
        key = (cell, a, b, state)
        if key not in self.tests:
            return Judged(None, "–")
        t = self.tests[key]
        return Judged(t, decide(t, self.holm.get(key), self.noise[cell], cell.mode, a, b, len(self)))


def one_seed_sigma(noise: dict, a, b):
    """σ of a one-seed comparison: the larger within-run std of the two (None where there is none:
    within_run_noise has none outside oneshot cells)."""
    if noise.get(a) is None or noise.get(b) is None:
        return None
    return max(noise[a], noise[b])


def significance(winner, p_holm, p, family: int, how: str, bar: str = "") -> str:
    """A verdict from its Holm-adjusted and raw p: the winner, or within noise, saying "not
    significant after Holm" where the raw p (and so the raw 95% interval) alone would name one."""
    bar = f"{bar}; " if bar else ""
    if p_holm < ALPHA:
        return f"**{winner}** ({bar}Holm p={p_holm:.3f}, p={p:.3f}; {how})"
    if p < ALPHA:
        return f"within noise: not significant after Holm over {family} tests ({bar}Holm p={p_holm:.2f}, " \
               f"p={p:.3f}; {how})"
    return f"within noise ({bar}Holm p={p_holm:.2f}, p={p:.2f}; {how})"


def decide(t: Paired, p_holm, noise: dict, mode: str, a: str, b: str, family: int) -> str:
    """The verdict of the paired test t of b against a (Δ = b − a), as the policy above says;
    family: the tests Holm corrects over."""
    winner = b if (t.delta or 0) > 0 else a
    if t.n == 0:
        return "no verdict: no seed in common"
    if t.n >= 2:
        return "n/a (no seed variance)" if t.p is None else significance(winner, p_holm, t.p, family,
                                                                          f"paired over {t.n} seeds")
    if mode != "oneshot":
        return f"no verdict: one seed, and no within-run noise under {mode} (run several seeds)"
    sigma = one_seed_sigma(noise, a, b)
    if sigma is None:
        return "no verdict: one seed, and within-run noise needs >= 4 states"
    if sigma == 0:
        return "no verdict: one seed, and its states >= 2 do not vary (no within-run noise)"
    z, p = one_seed_z(t.delta, sigma)
    bar = f"z = {z:.2f} against √2σ = {math.sqrt(2) * sigma:.2f}"
    if p_holm < ALPHA:
        return f"**{winner}** beyond within-run noise ({bar}; Holm p={p_holm:.3f}, p={p:.3f}; one seed: " \
               f"not a seed-to-seed result)"
    return significance(winner, p_holm, p, family, "one seed", bar)
