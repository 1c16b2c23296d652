"""The report's Markdown: the comparison tables, the state-by-state table, and per dataset the
runs' states, findings, parameter efficiency and training time."""
from vitprune import fmt
from vitprune.config import NOT_ZEROED
from vitprune.report.runs import BEST_EPOCH, HEADLINE, RunRecords
from vitprune.report.stats import (EQUAL_COMPUTE, RISING, cell_groups, compute_to_reach, configurations,
                                   equal_compute, equal_compute_verdicts, has_compute, late_start,
                                   matching_pruned_epochs, mean, row_verdict, run_result, run_stats, state_verdict,
                                   std, within_run_noise)

FLAG = "⚠"  # marks RSST states whose targets were not driven to zero
DELTA = "Δ (best − next)"
COMPUTE_COLUMN = "Compute to reach this state"
# The rows of the comparison table: (run_stats key, title); what each may conclude is stats.POLICY.
ROWS = (("state0", "State 0 (dense)"), ("state1", "State 1 (the methods' tickets)"),
        ("best", "Best pruned state (by val)"), ("mean", "Mean"), ("std", "Std"),
        ("retention", "Retention: best pruned / State 0"), ("late", "Late phase mean"), ("last", "Last common state"))


def comparison(groups: dict, n: int, schedule="oneshot", key=HEADLINE) -> list:
    """Rows (metric, title, {label: cell}, Δ, verdict) of the seed's comparison table."""
    stats = {label: [run_stats(r, n, key) for r in runs] for label, runs in groups.items()}
    noise = within_run_noise(groups, n, schedule, key)
    flagged = {label: any(r.not_zeroed(1) for r in runs) for label, runs in groups.items()}
    table = []
    for metric, title in ROWS:
        title = _row_title(metric, title, n)
        values = {label: [s[metric] for s in ss if s[metric] is not None] for label, ss in stats.items()}
        cells = {label: _cell(values[label], ss, metric) + (f" {FLAG}" if metric == "state1" and flagged[label] else "")
                 for label, ss in stats.items()}
        table.append((metric, title, cells, *row_verdict(metric, values, noise, schedule)))
    return table


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


def by_state(groups: dict, n: int, schedule: str, key=HEADLINE) -> list:
    """Rows (state, {label: cell}, Δ, verdict) comparing the configurations state by state."""
    rows, noise = [], within_run_noise(groups, n, schedule, key)
    for s in range(1, n):
        values = {label: [r.states[s][key] for r in runs] for label, runs in groups.items()}
        cells = {label: _cell(v, None, "state") + (f" {FLAG}" if any(r.not_zeroed(s) for r in groups[label]) else "")
                 for label, v in values.items()}
        rows.append((s, cells, *state_verdict(s, values, noise, schedule)))
    return rows



def _pct(x, signed=False):
    return "n/a" if x is None else (f"{x:+.2f}" if signed else f"{x:.2f}%")


def comparison_table(groups, n, schedule="oneshot", key=HEADLINE) -> list:
    rows = comparison(groups, n, schedule, key)
    if not all(has_compute(r) for runs in groups.values() for r in runs):  # records before compute accounting
        return fmt.table(["Metric", *groups, DELTA, "Winner"],
                         [[t, *cells.values(), _pct(d, signed=True), v] for _, t, cells, d, v in rows])
    def reach(metric, cells):  # per configuration, in the columns' order; n/a where its cell is
        return " / ".join("n/a" if cells[label].startswith("n/a") else
                          fmt.flops(compute_to_reach(runs, metric, n, key)) for label, runs in groups.items())
    return fmt.table(["Metric", *groups, DELTA, "Winner", COMPUTE_COLUMN],
                     [[t, *cells.values(), _pct(d, signed=True), v, reach(m, cells)] for m, t, cells, d, v in rows])


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
    "geometric": "Schedule **geometric**: every state prunes further, so each state has its own sparsity and the "
                 "methods select their own tickets from state 2 on. States are compared one by one, over seeds; "
                 "there is no within-run noise estimate.",
}


def key_result(groups, n, schedule) -> list:
    if len(groups) < 2:
        return [f"**Key result**: one configuration ({', '.join(groups)}): nothing to compare.", ""]
    if n < 2:
        return ["**Key result**: no pruned state in common yet: nothing to compare.", ""]
    row = {r[0]: r for r in comparison(groups, n, schedule)}["state1" if schedule == "oneshot" else "last"]
    _, title, cells, _, verdict = row
    what = "State 1" if schedule == "oneshot" else f"the last common state ({n - 1})"
    return [f"**Key result** (final pruned test accuracy at {what}): " +
            " vs ".join(f"{label} {cell}" for label, cell in cells.items()) + f" → {verdict}.", ""]


def dataset_section(title, runs, schedule, png) -> list:
    groups = configurations(runs)
    n = min(len(r.states) for r in runs)
    lines = [f"## {title}", "", SCHEDULE_NOTE[schedule], ""]
    counts = {r.name: len(r.states) for r in runs}
    if len(set(counts.values())) > 1:
        lines += ["Runs finished different numbers of states (" +
                  ", ".join(f"{k}: {v}" for k, v in counts.items()) +
                  f"); the comparisons use the {n} common states 0–{n - 1}.", ""]
    lines += key_result(groups, n, schedule)
    if any(r.not_zeroed(s) for r in runs for s in range(len(r.states))):
        lines += [f"{FLAG} = RSST targets not driven to zero at the hard prune (‖w_T‖ ratio > {NOT_ZEROED:g}): "
                  f"that state's hard prune removed live weights.", ""]
    for key, heading in ((HEADLINE, "Final pruned test accuracy (headline)"),
                         (BEST_EPOCH, "Best-epoch test accuracy (test acc at the state's epoch of best val acc)")):
        lines += [f"### {heading}", ""] + comparison_table(groups, n, schedule, key) + [""]
    if n >= 2:
        lines += ["### State by state (final pruned test accuracy)", ""] + fmt.table(
            ["State", *groups, DELTA, "Winner"],
            [[s, *cells.values(), _pct(d, signed=True), v] for s, cells, d, v in by_state(groups, n, schedule)]) + [""]
    lines += [f"![accuracy vs state]({png['states']})", "", "### Per-state accuracy", ""]
    for r in runs:
        lines += per_state(r)
    lines += findings(runs, n) + efficiency(runs) + timing(runs)
    lines += [f"![val accuracy vs epoch]({png['epochs']})", ""]
    return lines


def per_state(r: RunRecords) -> list:
    rows = [("final test (pruned)", HEADLINE, _num), ("final val (pruned)", "final_val_acc", _num),
            ("best-epoch test", BEST_EPOCH, _num), ("before hard prune (RSST)", "pre_prune_test_acc", _num),
            ("targets' norm at hard prune (RSST)", "target_norm_ratio", _ratio_cell),
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



# ---- compute ---------------------------------------------------------------------------------

COMPUTE_NOTE = (
    "Training compute: the FLOPs of every training step a run took (forward and backward of the network "
    "as it trains, plus a teacher's forward), from `train_flops` in its records; evaluation is not counted. "
    "**Prune-and-fine-tune**: refill with 2 states and `--rewind=none`: prune once after State 0, then train "
    "the ticket one long state from State 0's weights. A run's result is its best pruned state by validation "
    "accuracy (its test accuracy), charged with the compute of the whole run. **Equal compute**: a fine-tune "
    f"run and a loop run of the same seed whose training FLOPs differ by at most {EQUAL_COMPUTE:.0%} of the "
    "loop's; the verdict is a paired t-test over those seeds (Holm-corrected over the report's equal-compute "
    "comparisons), a winner named at p < 0.05.")


def compute_section(cells, pngs) -> list:
    """Per cell (same model, data, ratio): the accuracy-vs-compute figure, each configuration's
    compute and result, and the equal-compute verdicts. cells: stats.compute_cells."""
    lines = ["## Compute: accuracy vs training compute", ""]
    if not any(with_ for _, with_, _ in cells):
        return lines + ["No compute figure and no equal-compute verdict: no run has `train_flops` in its "
                        "records (written before compute accounting).", ""]
    lines += [COMPUTE_NOTE, ""]
    rows = [equal_compute(with_) for _, with_, _ in cells]
    verdicts = iter(equal_compute_verdicts([row for cell in rows for row in cell]))
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
                           [_equal_row(next(verdicts)) for _ in cell_rows]) + [""]
    return lines


def compute_table(runs) -> list:
    rows = []
    for label, group in cell_groups(runs).items():
        results = [run_result(r) for r in group]
        accs, flops = [x[0] for x in results if x], [x[1] for x in results if x]
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
