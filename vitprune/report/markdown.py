"""The report's Markdown, from its computed numbers (analysis.Analysis): the comparison tables, the
state-by-state table, and per dataset the runs' states, findings, parameter efficiency and
training time; the compute section."""
from vitprune import fmt
from vitprune.config import NOT_ZEROED
from vitprune.report.analysis import Analysis, CellTables, ComputeCell, Row, RunNumbers, Section
from vitprune.report.compute import EQUAL_COMPUTE
from vitprune.report.policy import ALPHA, NO_REWIND
from vitprune.report.runs import BEST_EPOCH, HEADLINE
from vitprune.report.stats import RISING, Summary

FLAG = "⚠"  # marks RSST states whose targets were not driven to zero
COMPUTE_COLUMN = "Compute to reach this state"
CI = "95% CI, unadjusted"  # the raw t-interval: the verdict beside it is Holm's
# The titles of the comparison table's rows (policy.METRICS; what each may conclude is policy.POLICY).
TITLES = {"state0": "State 0 (dense)", "state1": "State 1 (the methods' tickets)",
          "best": "Best pruned state (by val)", "mean": "Mean", "std": "Std",
          "retention": "Retention: best pruned / State 0", "late": "Late phase mean", "last": "Last common state"}


def comparison(cell: CellTables, key=HEADLINE) -> list:
    """Rows (metric, title, {label: cell}, [(Δ text, verdict) per pair]) of the seed's comparison
    table; only the headline's rows carry verdicts."""
    return [(row.metric, _row_title(row.metric, cell), _cells(row), [(_delta(j.test), j.verdict) for j in row.pairs])
            for row in cell.tables[key]]


def _cells(row: Row) -> dict:
    unit = "" if row.metric == "std" else "%"
    return {label: _cell(s, unit) + (f" {FLAG}" if row.flagged[label] else "") for label, s in row.values.items()}


def _delta(test) -> str:
    """Δ b − a with its 95% interval (none without spread), n/a where nothing was tested."""
    if test is None or test.delta is None:
        return "n/a"
    return f"{test.delta:+.2f}" + ("" if test.p is None else f" [{test.low:+.2f}, {test.high:+.2f}]")


def _row_title(metric, cell: CellTables):
    n = cell.n
    spans = {"mean": f"Mean, {_span(2, n - 1)}", "std": f"Std over {_span(2, n - 1)}",
             "late": f"Late phase mean, {_span(cell.late, n - 1)}", "last": f"Last common state ({n - 1})"}
    return spans.get(metric, TITLES[metric])


def _span(first, last):
    if last < first:
        return f"states {first}+ (none)"
    return f"state {first}" if last == first else f"states {first}–{last}"


def _cell(s: Summary, unit="%"):
    if not s.n:
        return "n/a"
    text = f"{s.mean:.2f}{unit}"
    if s.n >= 2:
        text += f" ± {s.std:.2f} ({s.n} seeds)"
    elif s.state is not None:
        text += f" (state {s.state})"
    return text


def _pct(x, signed=False):
    return "n/a" if x is None else (f"{x:+.2f}" if signed else f"{x:.2f}%")


def pair_header(cell: CellTables, tests: int) -> list:
    holm = f" (paired; Holm over {tests} tests)" if tests else ""
    return [h for a, b in cell.pairs for h in (f"Δ {b} − {a} [{CI}]", f"Winner{holm}" if len(cell.pairs) == 1
                                                 else f"Winner {a} vs {b}{holm}")]


def comparison_table(cell: CellTables, tests: int, key=HEADLINE) -> list:
    headline = key == HEADLINE  # the verdicts are the headline's: the other table describes
    header = ["Metric", *cell.labels, *(pair_header(cell, tests) if headline else []),
              *([COMPUTE_COLUMN] if cell.compute else [])]
    return fmt.table(header, [[t, *cells.values(), *(x for pair in pairs for x in pair if headline),
                               *([_reach(row)] if cell.compute else [])]
                              for row, (_, t, cells, pairs) in zip(cell.tables[key], comparison(cell, key))])


def _reach(row: Row) -> str:
    """The compute column: per configuration, in the columns' order; n/a where its cell is."""
    return " / ".join("n/a" if not row.values[label].n else fmt.flops(flops) for label, flops in row.reach.items())


def headline_tables(section: Section, tests: int) -> list:
    """The section's headline comparison tables, one per cell, each under its cell's name."""
    return [line for c in section.cells
            for line in [f"**{c.name or section.dataset}**", ""] + comparison_table(c, tests) + [""]]


def verdict_note(tests: int, one_seed: int) -> list:
    if not tests:
        return ["Winner: no test in this report (no seed in common, or no within-run noise to judge one seed "
                "by). imp and dense are references, not contestants.", ""]
    of = f" ({one_seed} of them one-seed)" if one_seed else ""
    return [f"Winner: paired t-test on the per-seed differences over the seeds both columns have whose splits "
            f"agree (Δ = mean difference, [raw 95% t-interval, not adjusted for the number of tests]); with one "
            f"seed, the gap against the within-run noise (z = Δ / √2σ, normal p). p-values **Holm-corrected over "
            f"the {tests} tests of this report**{of}, a winner needs Holm p < {ALPHA:g}; where the raw interval "
            f"excludes 0 but Holm names no winner, the verdict says so. imp and dense are references, not "
            f"contestants.", ""]


CELLS_NOTE = ("Cells: runs are compared only inside a cell, the runs of one data set and schedule that agree on "
              "every flag but method, seed and RSST's own `--reg_*` (what is pruned, how much, how the keep set is "
              "chosen, the recipe, the retraining) and on the numerics they ran with (precision, device type, "
              "kernel backend, `--compile`, as recorded; older records: their flags). Records written before a "
              "flag existed are read with the value it had then.")


def heading(title, runs, numbers: Analysis) -> list:
    """The report's title, what its headline number is, what splits its cells, which runs it did
    not pair, and the table of its runs."""
    lines = [f"# {title}", "",
             "Headline numbers are the **final pruned test accuracy** of each state: the network after the "
             "state's pruning (RSST: after its hard prune). Best-epoch accuracies are shown separately, labelled.", "",
             f"{CELLS_NOTE} Cells are split in this report by: "
             f"{', '.join(numbers.split_by) or 'none (one cell per data set and schedule)'}.", ""]
    if numbers.refused:
        lines += ["Refused pairs (the runs' val/test splits differ: `split_fingerprint`): " +
                  ", ".join(f"{a} × {b} (seed {seed})" for seed, a, b in numbers.refused) + ".", ""]
    if numbers.unverified:
        lines += ["Paired without a split fingerprint (records written before it was recorded): " +
                  ", ".join(numbers.unverified) + ".", ""]
    return lines + fmt.table(["Run", "Dataset", "Method", "Model", "Ratio", "Seed", "States", "Epochs/state", "Status"],
                             [[r.name, *(r.config.get(k) for k in ("dataset", "method", "model", "ratio", "seed")),
                               f"{len(r.states)}/{r.config.get('states', '?')}", r.config.get("epochs"), r.status]
                              for r in runs]) + [""]


SCHEDULE_NOTE = {
    "oneshot": "Schedule **oneshot**: every state ≥ 1 keeps the same groups, so from state 2 on every method "
               "retrains the same ticket from the rewind point (same keep set, no RSST targets). Only **State 1** "
               "can tell the methods apart; states ≥ 2 measure the noise of retraining a ticket and carry no "
               "winner.",
    NO_REWIND: "Schedule **oneshot** with `--rewind=none` (learning-rate rewinding, or fine-tuning with "
               "`--retrain_lr`): every state ≥ 1 keeps the groups of state 1, but without weight rewinding each "
               "method carries its own trained weights into states ≥ 2, so those states differ between methods: "
               "they are compared one by one, like geometric states, with no within-run noise estimate.",
    "geometric": "Schedule **geometric**: every state prunes further, so each state has its own sparsity and the "
                 "methods select their own tickets from state 2 on. States are compared one by one, over seeds; "
                 "there is no within-run noise estimate.",
}


def key_result(cell: CellTables) -> list:
    n = cell.n
    if not cell.pairs:
        return [f"**Key result**: no Refill/RSST pair to compare ({', '.join(cell.labels)}).", ""]
    if n < 2:
        return ["**Key result**: no pruned state in common yet: nothing to compare.", ""]
    _, _, cells, pairs = {r[0]: r for r in comparison(cell)}["state1" if cell.mode == "oneshot" else "last"]
    what = "State 1" if cell.mode == "oneshot" else f"the last common state ({n - 1})"
    tests = "; ".join(f"Δ {b} − {a} = {d} → {v}" for (a, b), (d, v) in zip(cell.pairs, pairs))
    return [f"**Key result** (final pruned test accuracy at {what}): " +
            " vs ".join(f"{label} {c}" for label, c in cells.items()) + f"; {tests}.", ""]


def dataset_section(section: Section, tests: int, png, one_seed: int = 0) -> list:
    runs, n = [x.run for x in section.runs], section.n
    lines = [f"## {section.title}", ""]
    for m in dict.fromkeys(c.mode for c in section.cells):
        lines += [SCHEDULE_NOTE[m], ""]
    counts = {r.name: len(r.states) for r in runs}
    if len(set(counts.values())) > 1:
        lines += ["Runs finished different numbers of states (" +
                  ", ".join(f"{k}: {v}" for k, v in counts.items()) +
                  f"); the comparisons use the common states of each cell (here 0–{n - 1}).", ""]
    if any(r.not_zeroed(s) for r in runs for s in range(len(r.states))):
        lines += [f"{FLAG} = RSST targets not driven to zero at the hard prune (the largest target group kept "
                  f"more than {NOT_ZEROED:g} of its norm): that state's hard prune removed live weights.", ""]
    if any(c.pairs for c in section.cells):
        lines += verdict_note(tests, one_seed)
    for cell in section.cells:
        lines += cell_section(cell, tests, len(section.cells) > 1)
    lines += [f"![accuracy vs state]({png['states']})", "", "### Per-state accuracy", ""]
    for numbers in section.runs:
        lines += per_state(numbers)
    lines += findings(section.runs, n) + efficiency(runs) + timing(section.runs)
    lines += [f"![val accuracy vs epoch]({png['epochs']})", ""]
    return lines


def cell_section(cell: CellTables, tests: int, named: bool) -> list:
    """One cell's key result, comparison tables and state-by-state table."""
    lines = [f"### Cell: {cell.name}", ""] if named else []
    suffix = f" — {cell.name}" if named else ""
    lines += key_result(cell)
    for key, heading in ((HEADLINE, "Final pruned test accuracy (headline)"),
                         (BEST_EPOCH, "Best-epoch test accuracy (test acc at the state's epoch of best val acc)")):
        lines += [f"### {heading}{suffix}", ""] + comparison_table(cell, tests, key) + [""]
    if cell.n >= 2:
        lines += [f"### State by state (final pruned test accuracy){suffix}", ""] + fmt.table(
            ["State", *cell.labels, *pair_header(cell, tests)],
            [[row.metric, *_cells(row).values(), *(x for j in row.pairs for x in (_delta(j.test), j.verdict))]
             for row in cell.by_state])
        lines += [""]
    return lines


def per_state(numbers: RunNumbers) -> list:
    r = numbers.run
    rows = [("final test (pruned)", HEADLINE, _num), ("final val (pruned)", "final_val_acc", _num),
            ("best-epoch test", BEST_EPOCH, _num), ("before hard prune (RSST)", "pre_prune_test_acc", _num),
            ("targets' norm at hard prune (RSST)", "target_norm_ratio", _ratio_cell),
            ("largest target group's norm at hard prune (RSST)", "target_norm_ratio_max", _ratio_cell),
            ("start (rewound + pruned)", "start_test_acc", _num), ("params alive", "params_alive", fmt.count)]
    body = [[title, *("" if s.get(key) is None else show(s[key]) for s in r.states)] for title, key, show in rows
            if any(s.get(key) is not None for s in r.states)]
    planned = r.config.get("states")
    head = f"**{r.name}** ({r.label}, {len(r.states)}" + (f" of {planned}" if planned else "") + f" states, {r.status})"
    stats = numbers.own
    trend = "" if stats["best"] is None else (
        f"Best pruned state by val: state {stats['best_state']}, test {stats['best']:.2f}%" +
        (f"; states 2+ range {min(r.acc()[2:]):.2f}–{max(r.acc()[2:]):.2f}%." if len(r.states) > 2 else "."))
    return [head, ""] + fmt.table(["State", *range(len(r.states))], body) + ["", trend, ""]


def _num(x):
    return f"{x:.2f}"


def _ratio_cell(x):
    return f"{x:.3f} {FLAG}" if x > NOT_ZEROED else f"{x:.3f}"


def findings(numbers: list, n) -> list:
    """From each run's RunNumbers: the effect of pruning, state 0's trend, the recovery after pruning."""
    lines = [f"### Finding 1: effect of pruning vs State 0 (common states 0–{n - 1})", ""]
    rows = []
    for x in numbers:
        r, s = x.run, x.common
        gain = lambda x: None if x is None else x - s["state0"]
        best = "n/a" if s["best"] is None else f"{s['best']:.2f}% (state {s['best_state']})"
        rows.append([r.name, _pct(s["state0"]), best, _pct(gain(s["best"]), True),
                     _pct(s["mean"]), _pct(gain(s["mean"]), True)])
    lines += fmt.table(["Run", "State 0", "Best pruned (by val)", "Δ best", "Mean states 2+", "Δ mean"], rows) + [""]

    lines += ["### Finding 2: is State 0 still improving? (val accuracy per epoch of state 0)", ""]
    rows = []
    for x in numbers:
        t = x.trend
        if t is None:
            rows.append([x.run.name, "n/a", "n/a", "n/a", "n/a (needs >= 2 epochs)"])
            continue
        verdict = "still rising" if t.rising else "plateaued"
        rows.append([x.run.name, _pct(t.first), _pct(t.last), _pct(t.last - t.first, True),
                     f"{verdict} (last {t.k} vs the {t.k} before: {t.last - t.before:+.2f})"])
    lines += fmt.table(["Run", "First-k mean", "Last-k mean", "Δ", "Verdict"], rows)
    lines += ["", f"k = min(5, epochs/2); \"still rising\" = the last k epochs beat the k before "
                  f"by > {RISING} points.", ""]

    lines += ["### Finding 3: recovery after pruning (test accuracy)", ""]
    rows = []
    for r in (x.run for x in numbers):
        if len(r.states) < 2:
            rows.append([r.name] + ["n/a"] * 6)
            continue
        s0, s1 = r.states[0][HEADLINE], r.states[1][HEADLINE]
        e0 = r.state_epochs(1, "test_acc")[:1]
        rows.append([r.name, _pct(s0), _pct(r.states[1].get("start_test_acc")), _pct(e0[0] if e0 else None),
                     _pct(e0[0] - s0 if e0 else None, True), _pct(s1), _pct(s1 - s0, True)])
    lines += fmt.table(["Run", "State 0 final", "State 1 start (rewound + pruned)", "State 1 epoch 0",
                     "Drop", "State 1 final", "Recovered (vs State 0)"], rows) + [""]
    return lines


def efficiency(runs) -> list:
    # (title, alive count in a state record, its dense total in the run's state 0 record)
    items = [("Total parameters", "params_alive", "params_total"),
             ("Attention parameters", "attn_params_alive", "attn_params_alive"),
             ("MLP parameters", "mlp_params_alive", "mlp_params_alive"),
             ("Heads", "heads_alive", "heads_total"), ("MLP neurons", "neurons_alive", "neurons_total"),
             ("FLOPs per image", "flops_alive", "flops_total")]
    rows = []
    for title, alive_key, total_key in items:
        totals = [r.states[0].get(total_key) for r in runs]
        if None in totals:
            continue
        cells = []
        for r, total in zip(runs, totals):
            alive = r.states[-1].get(alive_key)
            cells.append("n/a" if not alive else f"{fmt.count(alive)} ({total / alive:.2f}×)")
        rows.append([title, " / ".join(map(fmt.count, dict.fromkeys(totals))), *cells])
    header = ["", "Dense (State 0)", *(f"{r.name} (state {len(r.states) - 1})" for r in runs)]
    return ["### Parameter efficiency (alive after the last state; compression ×)", ""] + fmt.table(header, rows) + [""]


def timing(numbers: list) -> list:
    rows = []
    for x in numbers:
        t = x.times
        rows.append([x.run.name, fmt.duration(t.state0), "n/a" if t.state1 is None else fmt.duration(t.state1),
                     "n/a" if t.later is None else fmt.duration(t.later), fmt.duration(t.total),
                     fmt.duration(t.per_epoch) if t.per_epoch else "n/a"])
    return ["### Training time", ""] + fmt.table(
        ["Run", "State 0", "State 1", "States 2+ (mean per state)", "Total", "Per epoch"], rows) + [""]



def rsst_diagnostics(label, png) -> list:
    """The section of one RSST configuration's diagnostics figure."""
    return [f"### RSST diagnostics: {label}", "",
            "Over state 1 (x: its progress; one line per run): the LR and the penalty coefficient (each ÷ its "
            "largest), the targets' norm ratio (all targets; the largest single group) and the val accuracy of "
            "the network without its targets; the dashed line is the hard prune. It shows whether the pull "
            f"comes while the LR can still let the surviving groups take over. Dotted: {NOT_ZEROED:g}.", "",
            f"![RSST diagnostics]({png})", ""]


# ---- compute ---------------------------------------------------------------------------------

COMPUTE_NOTE = (
    "Training compute: the FLOPs of every training step a run took (forward and backward of the network "
    "as it trains, plus a teacher's forward), from `train_flops` in its records; evaluation is not counted. "
    "The four ways of retraining a ticket are configurations of the loop: **weight rewinding** "
    "(`--rewind=init|epoch:K`, the ticket loop), **learning-rate rewinding** (`--rewind=none`: State 0's "
    "trained weights, the LR schedule replayed; Renda et al. 2020), **fine-tuning** (`--rewind=none "
    "--retrain_lr=final|VALUE`: the trained weights at a constant LR) and **scratch** (`--rewind=random`: the "
    "ticket's structure from a fresh init; Liu et al. 2019, Scratch-E/B). A run's result is its best pruned "
    "state by validation accuracy (its test accuracy), charged with the compute of the whole run. **Equal "
    f"compute**: two runs of one seed whose training FLOPs differ by at most {EQUAL_COMPUTE:.0%}; each "
    "configuration is compared with the closest in compute of every other strategy, by a paired t-test over "
    "those seeds (Holm-corrected together with every other test of the report), a winner named at Holm "
    "p < 0.05; the interval is the raw 95% t-interval.")


def compute_section(cells: list, pngs) -> list:
    """Per compute cell (same model, data, ratio; analysis.ComputeCell): the accuracy-vs-compute figure,
    each configuration's compute and result, and the equal-compute verdicts."""
    lines = ["## Compute: accuracy vs training compute", ""]
    if not any(c.runs for c in cells):
        return lines + ["No compute figure and no equal-compute verdict: no run has `train_flops` in its "
                        "records (written before compute accounting).", ""]
    lines += [COMPUTE_NOTE, ""]
    for cell, png in zip(cells, pngs):
        lines += [f"### {cell.title}", ""]
        if cell.without:
            lines += ["No compute figure or verdict for " + ", ".join(r.name for r in cell.without) +
                      ": no `train_flops` in their records (written before compute accounting).", ""]
        if not cell.runs:
            continue
        lines += [f"![test accuracy vs cumulative training compute]({png})", ""] + compute_table(cell) + [""]
        if not cell.equal:
            lines += ["No equal-compute verdict: the cell needs refill or rsst configurations of two ways of "
                      "retraining (weight rewinding, learning-rate rewinding, fine-tuning, scratch).", ""]
            continue
        lines += fmt.table(["Configuration A", "Configuration B", "Compute, B / A", "Seeds at equal compute",
                            "A", "B", f"Δ A − B [{CI}]", "Winner at equal compute"],
                           [_equal_row(row) for row in cell.equal]) + [""]
    return lines


def compute_table(cell: ComputeCell) -> list:
    rows = [[s.label, s.runs, fmt.flops(s.flops), fmt.duration(s.seconds) if s.seconds else "n/a", _cell(s.acc),
             "–" if s.pruned_epochs is None else f"`--pruned_epochs={round(s.pruned_epochs)}`"] for s in cell.spent]
    return fmt.table(["Configuration", "Runs", "Training compute (mean)", "Training time (mean)",
                      "Best pruned test accuracy (by val)", "2-state retraining of equal compute"], rows)


def _equal_row(row) -> list:
    t = row.test
    ci = "" if t.low is None else f" [{t.low:+.2f}, {t.high:+.2f}]"
    return [row.a, row.b, "n/a" if row.ratio is None else f"{row.ratio:.2f}",
            f"{t.n} ({', '.join(map(str, sorted(row.a_acc)))})" if t.n else "0",
            _cell(row.a_summary), _cell(row.b_summary),
            "n/a" if t.delta is None else f"{t.delta:+.2f}{ci}", row.verdict]
