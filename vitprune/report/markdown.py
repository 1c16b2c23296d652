"""The report's Markdown: the comparison tables, the state-by-state table, and per dataset the
runs' states, findings, parameter efficiency and training time."""
from vitprune import fmt
from vitprune.config import NOT_ZEROED
from vitprune.report.runs import BEST_EPOCH, HEADLINE, RunRecords
from vitprune.report.compute import (EQUAL_COMPUTE, cell_groups, compute_to_reach, equal_compute_verdicts,
                                     has_compute, matching_pruned_epochs, run_result)
from vitprune.report.policy import ALPHA, POLICY, Cell, Verdicts
from vitprune.report.stats import RISING, late_start, mean, run_stats, std

FLAG = "⚠"  # marks RSST states whose targets were not driven to zero
COMPUTE_COLUMN = "Compute to reach this state"
# The rows of the comparison table: (run_stats key, title); what each may conclude is policy.POLICY.
ROWS = (("state0", "State 0 (dense)"), ("state1", "State 1 (the methods' tickets)"),
        ("best", "Best pruned state (by val)"), ("mean", "Mean"), ("std", "Std"),
        ("retention", "Retention: best pruned / State 0"), ("late", "Late phase mean"), ("last", "Last common state"))


def comparison(cell: Cell, verdicts: Verdicts, key=HEADLINE) -> list:
    """Rows (metric, title, {label: cell}, [(Δ text, verdict) per pair]) of the seed's comparison
    table; only the headline's rows carry verdicts."""
    n, table = cell.n, []
    stats = {label: [run_stats(r, n, key) for r in runs] for label, runs in cell.groups.items()}
    for metric, title in ROWS:
        title = _row_title(metric, title, n)
        values = {label: [s[metric] for s in ss if s[metric] is not None] for label, ss in stats.items()}
        cells = {label: _cell(values[label], ss, metric) + (f" {FLAG}" if _flagged(cell.groups[label], ss, metric, n)
                                                            else "") for label, ss in stats.items()}
        policy = POLICY[cell.mode][metric]
        state = {"state1": 1, "last": n - 1}.get(metric)
        pairs = [verdicts.verdict(cell, a, b, state)[1:] if policy == "compare" and key == HEADLINE
                 else ("n/a", policy) for a, b in cell.pairs()]
        table.append((metric, title, cells, pairs))
    return table


def _flagged(runs, stats, metric, n) -> bool:
    """⚠ on a row that shows (or averages) a state whose RSST targets were not driven to zero."""
    shown = {"state1": lambda s: [1], "last": lambda s: [n - 1], "best": lambda s: [s["best_state"]],
             "mean": lambda s: range(2, n), "std": lambda s: range(2, n), "late": lambda s: range(late_start(n), n),
             "retention": lambda s: [s["best_state"]]}.get(metric, lambda s: [])
    return any(state is not None and r.not_zeroed(state) for r, s in zip(runs, stats) for state in shown(s))


def _row_title(metric, title, n):
    spans = {"mean": f"Mean, {_span(2, n - 1)}", "std": f"Std over {_span(2, n - 1)}",
             "late": f"Late phase mean, {_span(late_start(n), n - 1)}", "last": f"Last common state ({n - 1})"}
    return spans.get(metric, title)


def _span(first, last):
    if last < first:
        return f"states {first}+ (none)"
    return f"state {first}" if last == first else f"states {first}–{last}"


def _cell(values, stats, metric):
    if not values:
        return "n/a"
    text = f"{mean(values):.2f}" + ("%" if metric != "std" else "")
    if len(values) >= 2:
        text += f" ± {std(values):.2f} ({len(values)} seeds)"
    elif metric == "best":
        text += f" (state {stats[0]['best_state']})"
    return text


def by_state(cell: Cell, verdicts: Verdicts, key=HEADLINE) -> list:
    """Rows (state, {label: cell}, [(Δ text, verdict) per pair]) comparing the methods state by state."""
    rows = []
    for s in range(1, cell.n):
        values = {label: [r.states[s][key] for r in runs] for label, runs in cell.groups.items()}
        cells = {label: _cell(v, None, "state") + (f" {FLAG}" if any(r.not_zeroed(s) for r in cell.groups[label]) else "")
                 for label, v in values.items()}
        same = cell.mode == "oneshot" and s >= 2
        rows.append((s, cells, [("n/a", "– (same ticket, retrained)") if same else verdicts.verdict(cell, a, b, s)[1:]
                                for a, b in cell.pairs()]))
    return rows


def _pct(x, signed=False):
    return "n/a" if x is None else (f"{x:+.2f}" if signed else f"{x:.2f}%")


def pair_header(cell: Cell, verdicts: Verdicts) -> list:
    holm = f" (paired; Holm over {len(verdicts)} tests)" if len(verdicts) else ""
    return [h for a, b in cell.pairs() for h in (f"Δ {b} − {a} [95% CI]", f"Winner{holm}" if len(cell.pairs()) == 1
                                                   else f"Winner {a} vs {b}{holm}")]


def comparison_table(cell: Cell, verdicts: Verdicts, key=HEADLINE) -> list:
    rows = comparison(cell, verdicts, key)
    headline = key == HEADLINE  # the verdicts are the headline's: the other table describes
    compute = all(has_compute(r) for runs in cell.groups.values() for r in runs)  # newer records only
    header = ["Metric", *cell.groups, *(pair_header(cell, verdicts) if headline else []),
              *([COMPUTE_COLUMN] if compute else [])]
    return fmt.table(header, [[t, *cells.values(), *(x for pair in pairs for x in pair if headline),
                               *([_reach(cell, m, cells, key)] if compute else [])]
                              for m, t, cells, pairs in rows])


def _reach(cell: Cell, metric, cells, key) -> str:
    """The compute column: per configuration, in the columns' order; n/a where its cell is."""
    return " / ".join("n/a" if cells[label].startswith("n/a") else
                      fmt.flops(compute_to_reach(runs, metric, cell.n, key)) for label, runs in cell.groups.items())


def verdict_note(verdicts: Verdicts) -> list:
    if not len(verdicts):
        return ["Winner: no seed-level test in this report (no two seeds in common); one-seed gaps are judged "
                "against the within-run noise only. imp and dense are references, not contestants.", ""]
    return [f"Winner: paired t-test on the per-seed differences over the seeds both columns have (Δ = mean "
            f"difference, [95% t-interval]); p-values **Holm-corrected over the {len(verdicts)} tests of this "
            f"report**, a winner needs Holm p < {ALPHA:g}. imp and dense are references, not contestants.", ""]


def heading(title, runs) -> list:
    """The report's title, what its headline number is, and the table of its runs."""
    lines = [f"# {title}", "",
             "Headline numbers are the **final pruned test accuracy** of each state: the network after the "
             "state's pruning (RSST: after its hard prune). Best-epoch accuracies are shown separately, labelled.", ""]
    return lines + fmt.table(["Run", "Dataset", "Method", "Model", "Ratio", "Seed", "States", "Epochs/state", "Status"],
                             [[r.name, *(r.config.get(k) for k in ("dataset", "method", "model", "ratio", "seed")),
                               f"{len(r.states)}/{r.config.get('states', '?')}", r.config.get("epochs"), r.status]
                              for r in runs]) + [""]


SCHEDULE_NOTE = {
    "oneshot": "Schedule **oneshot**: every state ≥ 1 keeps the same groups, so from state 2 on every method "
               "retrains the same ticket from the rewind point (same keep set, no RSST targets). Only **State 1** "
               "can tell the methods apart; states ≥ 2 measure the noise of retraining a ticket and carry no "
               "winner.",
    "oneshot, no rewind": "Schedule **oneshot** with `--rewind=none`: every state ≥ 1 keeps the groups of "
                          "state 1, but without rewinding each method carries its own trained weights into states "
                          "≥ 2, so those states differ between methods: they are compared one by one, like "
                          "geometric states, with no within-run noise estimate.",
    "geometric": "Schedule **geometric**: every state prunes further, so each state has its own sparsity and the "
                 "methods select their own tickets from state 2 on. States are compared one by one, over seeds; "
                 "there is no within-run noise estimate.",
}


def key_result(cell: Cell, verdicts: Verdicts) -> list:
    groups, n = cell.groups, cell.n
    if not cell.pairs():
        return [f"**Key result**: no Refill/RSST pair to compare ({', '.join(groups)}).", ""]
    if n < 2:
        return ["**Key result**: no pruned state in common yet: nothing to compare.", ""]
    _, _, cells, pairs = {r[0]: r for r in comparison(cell, verdicts)}["state1" if cell.mode == "oneshot" else "last"]
    what = "State 1" if cell.mode == "oneshot" else f"the last common state ({n - 1})"
    tests = "; ".join(f"Δ {b} − {a} = {d} → {v}" for (a, b), (d, v) in zip(cell.pairs(), pairs))
    return [f"**Key result** (final pruned test accuracy at {what}): " +
            " vs ".join(f"{label} {c}" for label, c in cells.items()) + f"; {tests}.", ""]


def dataset_section(title, runs, section_cells, verdicts, png) -> list:
    n = min(len(r.states) for r in runs)
    lines = [f"## {title}", ""]
    for m in dict.fromkeys(c.mode for c in section_cells):
        lines += [SCHEDULE_NOTE[m], ""]
    counts = {r.name: len(r.states) for r in runs}
    if len(set(counts.values())) > 1:
        lines += ["Runs finished different numbers of states (" +
                  ", ".join(f"{k}: {v}" for k, v in counts.items()) +
                  f"); the comparisons use the common states of each cell (here 0–{n - 1}).", ""]
    if any(r.not_zeroed(s) for r in runs for s in range(len(r.states))):
        lines += [f"{FLAG} = RSST targets not driven to zero at the hard prune (the largest target group kept "
                  f"more than {NOT_ZEROED:g} of its norm): that state's hard prune removed live weights.", ""]
    if any(c.pairs() for c in section_cells):
        lines += verdict_note(verdicts)
    for cell in section_cells:
        lines += cell_section(cell, verdicts, len(section_cells) > 1)
    lines += [f"![accuracy vs state]({png['states']})", "", "### Per-state accuracy", ""]
    for r in runs:
        lines += per_state(r)
    lines += findings(runs, n) + efficiency(runs) + timing(runs)
    lines += [f"![val accuracy vs epoch]({png['epochs']})", ""]
    return lines


def cell_section(cell: Cell, verdicts: Verdicts, named: bool) -> list:
    """One cell's key result, comparison tables and state-by-state table."""
    lines = [f"### Cell: {cell.name}", ""] if named else []
    suffix = f" — {cell.name}" if named else ""
    lines += key_result(cell, verdicts)
    for key, heading in ((HEADLINE, "Final pruned test accuracy (headline)"),
                         (BEST_EPOCH, "Best-epoch test accuracy (test acc at the state's epoch of best val acc)")):
        lines += [f"### {heading}{suffix}", ""] + comparison_table(cell, verdicts, key) + [""]
    if cell.n >= 2:
        lines += [f"### State by state (final pruned test accuracy){suffix}", ""] + fmt.table(
            ["State", *cell.groups, *pair_header(cell, verdicts)],
            [[s, *cells.values(), *(x for pair in pairs for x in pair)] for s, cells, pairs in by_state(cell, verdicts)])
        lines += [""]
    return lines


def per_state(r: RunRecords) -> list:
    rows = [("final test (pruned)", HEADLINE, _num), ("final val (pruned)", "final_val_acc", _num),
            ("best-epoch test", BEST_EPOCH, _num), ("before hard prune (RSST)", "pre_prune_test_acc", _num),
            ("targets' norm at hard prune (RSST)", "target_norm_ratio", _ratio_cell),
            ("largest target group's norm at hard prune (RSST)", "target_norm_ratio_max", _ratio_cell),
            ("start (rewound + pruned)", "start_test_acc", _num), ("params alive", "params_alive", fmt.count)]
    body = [[title, *("" if s.get(key) is None else show(s[key]) for s in r.states)] for title, key, show in rows
            if any(s.get(key) is not None for s in r.states)]
    planned = r.config.get("states")
    head = f"**{r.name}** ({r.label}, {len(r.states)}" + (f" of {planned}" if planned else "") + f" states, {r.status})"
    stats = run_stats(r)
    trend = "" if stats["best"] is None else (
        f"Best pruned state by val: state {stats['best_state']}, test {stats['best']:.2f}%" +
        (f"; states 2+ range {min(r.acc()[2:]):.2f}–{max(r.acc()[2:]):.2f}%." if len(r.states) > 2 else "."))
    return [head, ""] + fmt.table(["State", *range(len(r.states))], body) + ["", trend, ""]


def _num(x):
    return f"{x:.2f}"


def _ratio_cell(x):
    return f"{x:.3f} {FLAG}" if x > NOT_ZEROED else f"{x:.3f}"


def findings(runs, n) -> list:
    lines = [f"### Finding 1: effect of pruning vs State 0 (common states 0–{n - 1})", ""]
    rows = []
    for r in runs:
        s = run_stats(r, n)
        gain = lambda x: None if x is None else x - s["state0"]
        best = "n/a" if s["best"] is None else f"{s['best']:.2f}% (state {s['best_state']})"
        rows.append([r.name, _pct(s["state0"]), best, _pct(gain(s["best"]), True),
                     _pct(s["mean"]), _pct(gain(s["mean"]), True)])
    lines += fmt.table(["Run", "State 0", "Best pruned (by val)", "Δ best", "Mean states 2+", "Δ mean"], rows) + [""]

    lines += ["### Finding 2: is State 0 still improving? (val accuracy per epoch of state 0)", ""]
    rows = []
    for r in runs:
        v = r.state_epochs(0)
        k = min(5, len(v) // 2)
        if not k:
            rows.append([r.name, "n/a", "n/a", "n/a", "n/a (needs >= 2 epochs)"])
            continue
        first, last, before = mean(v[:k]), mean(v[-k:]), mean(v[-2 * k:-k])
        verdict = "still rising" if last - before > RISING else "plateaued"
        rows.append([r.name, _pct(first), _pct(last), _pct(last - first, True),
                     f"{verdict} (last {k} vs the {k} before: {last - before:+.2f})"])
    lines += fmt.table(["Run", "First-k mean", "Last-k mean", "Δ", "Verdict"], rows)
    lines += ["", f"k = min(5, epochs/2); \"still rising\" = the last k epochs beat the k before "
                  f"by > {RISING} points.", ""]

    lines += ["### Finding 3: recovery after pruning (test accuracy)", ""]
    rows = []
    for r in runs:
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


def timing(runs) -> list:
    rows = []
    for r in runs:
        t = [s.get("time_s", 0.0) for s in r.states]
        per_epoch = mean([e["time_s"] for e in r.epochs if e.get("time_s") is not None])
        rows.append([r.name, fmt.duration(t[0]), fmt.duration(t[1]) if len(t) > 1 else "n/a",
                     fmt.duration(mean(t[2:])) if len(t) > 2 else "n/a", fmt.duration(sum(t)),
                     fmt.duration(per_epoch) if per_epoch else "n/a"])
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
    "**Prune-and-fine-tune**: refill with 2 states and `--rewind=none`: prune once after State 0, then train "
    "the ticket one long state from State 0's weights. A run's result is its best pruned state by validation "
    "accuracy (its test accuracy), charged with the compute of the whole run. **Equal compute**: a fine-tune "
    f"run and a loop run of the same seed whose training FLOPs differ by at most {EQUAL_COMPUTE:.0%} of the "
    "loop's; the verdict is a paired t-test over those seeds (Holm-corrected together with every other test of "
    "the report), a winner named at p < 0.05.")


def compute_section(cells, rows, verdicts: Verdicts, pngs) -> list:
    """Per cell (same model, data, ratio): the accuracy-vs-compute figure, each configuration's
    compute and result, and the equal-compute verdicts. cells: compute.compute_cells; rows: their
    compute.equal_compute rows, whose tests are in `verdicts`' Holm family."""
    lines = ["## Compute: accuracy vs training compute", ""]
    if not any(with_ for _, with_, _ in cells):
        return lines + ["No compute figure and no equal-compute verdict: no run has `train_flops` in its "
                        "records (written before compute accounting).", ""]
    lines += [COMPUTE_NOTE, ""]
    judged = iter(equal_compute_verdicts([row for cell in rows for row in cell], verdicts.holm))
    for (title, with_, without), png, cell_rows in zip(cells, pngs, rows):
        lines += [f"### {title}", ""]
        if without:
            lines += ["No compute figure or verdict for " + ", ".join(r.name for r in without) +
                      ": no `train_flops` in their records (written before compute accounting).", ""]
        if not with_:
            continue
        lines += [f"![test accuracy vs cumulative training compute]({png})", ""] + compute_table(with_) + [""]
        if not cell_rows:
            lines += ["No equal-compute verdict: the cell needs a ticket loop (refill or rsst) and a "
                      "prune-and-fine-tune configuration.", ""]
            continue
        lines += fmt.table(["Ticket loop", "Prune-and-fine-tune", "Compute, fine-tune / loop", "Seeds at equal compute",
                            "Loop", "Fine-tune", "Δ loop − fine-tune [95% CI]", "Winner at equal compute"],
                           [_equal_row(next(judged)) for _ in cell_rows]) + [""]
    return lines


def compute_table(runs) -> list:
    rows = []
    for label, group in cell_groups(runs).items():
        results = [run_result(r) for r in group]
        accs = [x[0] for x in results if x]
        total = mean([r.states[-1]["train_flops"] for r in group])
        seconds = mean([r.states[-1].get("train_time_s") for r in group if r.states[-1].get("train_time_s")])
        matching = [m for m in map(matching_pruned_epochs, group) if m is not None]
        rows.append([label, len(group), fmt.flops(total), fmt.duration(seconds) if seconds else "n/a",
                     _cell(accs, None, "state") if accs else "n/a",
                     f"`--pruned_epochs={round(mean(matching))}`" if matching else "–"])
    return fmt.table(["Configuration", "Runs", "Training compute (mean)", "Training time (mean)",
                      "Best pruned test accuracy (by val)", "Prune-and-fine-tune of equal compute"], rows)


def _equal_row(row) -> list:
    t = row.test
    ci = "" if t.low is None else f" [{t.low:+.2f}, {t.high:+.2f}]"
    return [row.loop, row.finetune, "n/a" if row.ratio is None else f"{row.ratio:.2f}",
            f"{t.n} ({', '.join(map(str, sorted(row.loop_acc)))})" if t.n else "0",
            _cell(list(row.loop_acc.values()), None, "state") if t.n else "n/a",
            _cell(list(row.finetune_acc.values()), None, "state") if t.n else "n/a",
            "n/a" if t.delta is None else f"{t.delta:+.2f}{ci}", row.verdict]
