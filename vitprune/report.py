"""Seed-style report: Markdown tables + PNG plots comparing runs (run folders or a W&B project).

The headline number of a state is its FINAL PRUNED test accuracy (`final_test_acc`: the network
after the state's pruning, what one would deploy). The best-epoch accuracy (`best_test_acc`: test
accuracy at the epoch of best val accuracy) is shown beside it, labelled as such.

What is compared, and when a winner is named:
- runs of one dataset and schedule are compared over their common states 0..n-1;
- a configuration = the runs that differ only in seed (and in flags that do not apply to their
  method, or only say how to execute): its label names what differs and applies to it;
- any "best state" is chosen by VALIDATION accuracy (over states >= 1) and reported with its test
  accuracy: a maximum over noisy test scores would select on the test set;
- oneshot: every state >= 2 retrains the same ticket for every method (the selection is monotone:
  same keep set, no RSST targets), so only State 1 can tell the methods apart. States >= 2 are
  marked "same ticket, retrained", carry no winner, and their spread is the within-run noise;
- geometric: every state has its own sparsity, so there is no within-run noise; methods are
  compared state by state, over seeds;
- winner: with >= 2 seeds per configuration, Welch's t-test on the per-seed values (p < 0.05);
  with one seed (oneshot only), a gap beyond 2x the larger within-run std is reported as such,
  never as a seed-to-seed result; under geometric one seed gives no verdict;
- an RSST state whose targets kept more than NOT_ZEROED of their norm at the hard prune is
  flagged: its hard prune was a prune of live weights, not of zeroed ones.
"""
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from vitprune.config import ConfigError, configuration
from vitprune import fmt
from vitprune.log import read_metrics, record_from_wandb, resolve_wandb_mode
from vitprune.methods import NOT_ZEROED

HEADLINE, BEST_EPOCH = "final_test_acc", "best_test_acc"
VAL_OF = {HEADLINE: "final_val_acc", BEST_EPOCH: "best_val_acc"}  # the val twin that selects states
RISING = 0.5  # state 0 is "still rising" when its last k epochs beat the k before by > 0.5 points
FLAG = "⚠"    # marks RSST states whose targets were not driven to zero


@dataclass
class Run:
    name: str
    config: dict
    status: str
    epochs: list = field(default_factory=list)  # epoch records in order
    states: list = field(default_factory=list)  # state records for states 0, 1, ... (no gaps)
    label: str = ""                             # its configuration's name in the tables

    def acc(self, key=HEADLINE, n=None):
        return [s.get(key) for s in self.states[:n]]

    def state_epochs(self, state, key="val_acc"):
        return [e[key] for e in self.epochs if e["state"] == state and e.get(key) is not None]

    def not_zeroed(self, state) -> bool:
        """RSST state whose targets were not driven to zero before the hard prune."""
        ratio = self.states[state].get("target_norm_ratio") if state < len(self.states) else None
        return ratio is not None and ratio > NOT_ZEROED


def make_run(name, config, status, records) -> Run:
    """A Run from metrics records; a record written twice (resume) counts once, the last."""
    states = {r["state"]: r for r in records if r["kind"] == "state"}
    epochs = {(r["state"], r["epoch"]): r for r in records if r["kind"] == "epoch"}
    consecutive = []
    while len(consecutive) in states:
        consecutive.append(states[len(consecutive)])
    return Run(name, config, status, [epochs[k] for k in sorted(epochs)], consecutive)


def load_run(run_dir) -> Run:
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise ConfigError(f"report: {run_dir} is not a run folder (no metrics.jsonl); give folders under --out_dir")
    summary = _read_json(run_dir / "summary.json")
    config = _read_json(run_dir / "config.json") or summary.get("config", {})
    return make_run(run_dir.name, config, summary.get("status", "unknown"), read_metrics(run_dir))


def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def load_wandb_runs(project, entity=None) -> list:
    """The runs of a W&B project, rebuilt from their histories (names as logged by RunLog)."""
    import wandb
    runs = []
    for r in wandb.Api().runs(f"{entity}/{project}" if entity else project):
        records = [rec for rec in map(record_from_wandb, r.scan_history()) if rec]
        config = {k: v for k, v in dict(r.config).items() if not k.startswith("_")}
        runs.append(make_run(r.name, config, r.state, records))
    return runs


# ---- numbers ------------------------------------------------------------------------------

def _mean(xs):
    return statistics.fmean(xs) if xs else None


def _std(xs):
    return statistics.stdev(xs) if len(xs) >= 2 else None


def late_start(n):
    return max(2, n - math.ceil(n / 3))


def run_stats(run: Run, n=None, key=HEADLINE) -> dict:
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
        "mean": _mean(later),
        "std": _std(later),
        "retention": 100 * accs[best_state] / accs[0] if best_state and accs[0] else None,
        "late": _mean(accs[late_start(n):]) if n >= 3 else None,
        "last": accs[-1] if n >= 2 else None,
    }


def decide(values: dict, noise: dict, schedule="oneshot"):
    """(Δ best − next, verdict) for {label: per-seed values}; noise = {label: within-run std}."""
    ranked = sorted((k for k in values if values[k]), key=lambda k: -_mean(values[k]))
    if len(ranked) < 2:
        return None, "–"
    a, b = ranked[:2]
    delta = _mean(values[a]) - _mean(values[b])
    if len(values[a]) >= 2 and len(values[b]) >= 2:
        if statistics.stdev(values[a]) == statistics.stdev(values[b]) == 0:  # Welch is undefined
            return delta, "n/a (no seed variance)"
        from scipy.stats import ttest_ind
        p = ttest_ind(values[a], values[b], equal_var=False).pvalue
        seeds = f"{min(len(values[a]), len(values[b]))}+ seeds"
        return delta, f"**{a}** (Welch p={p:.3f}, {seeds})" if p < 0.05 else f"within noise (Welch p={p:.2f}, {seeds})"
    if schedule != "oneshot":
        return delta, "no verdict: one seed, and no within-run noise under geometric (run several seeds)"
    if noise.get(a) is None or noise.get(b) is None:
        return delta, "no verdict: one seed, and within-run noise needs >= 4 states"
    bar = 2 * max(noise[a], noise[b])
    if delta > bar:
        return delta, f"**{a}** beyond within-run noise (2σ = {bar:.2f}; one seed: not a seed-to-seed result)"
    return delta, f"within noise (2σ = {bar:.2f}, within-run; one seed)"


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


# What each row of the comparison may conclude, per schedule: "compare" (a winner can be named),
# or the reason none can.
ROWS = (("state0", "State 0 (dense)"), ("state1", "State 1 (the methods' tickets)"),
        ("best", "Best pruned state (by val)"), ("mean", "Mean"), ("std", "Std"),
        ("retention", "Retention: best pruned / State 0"), ("late", "Late phase mean"), ("last", "Last common state"))
POLICY = {
    "oneshot": {"state0": "– (dense: the same recipe for every method)", "state1": "compare",
                "best": "– (states ≥ 2: same ticket, retrained)", "mean": "– (same ticket, retrained)",
                "std": "– (within-run noise)", "retention": "– (states ≥ 2: same ticket, retrained)",
                "late": "– (same ticket, retrained)", "last": "– (same ticket, retrained)"},
    "geometric": {"state0": "– (dense: the same recipe for every method)", "state1": "compare",
                  "best": "– (states differ in sparsity)", "mean": "– (states differ in sparsity)",
                  "std": "– (states differ in sparsity: not noise)", "retention": "– (states differ in sparsity)",
                  "late": "– (states differ in sparsity)", "last": "compare"},
}


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
        policy = POLICY[schedule][metric]
        delta, verdict = decide(values, noise, schedule) if policy == "compare" else (None, policy)
        table.append((metric, title, cells, delta, verdict))
    return table


def within_run_noise(groups: dict, n: int, schedule: str, key=HEADLINE) -> dict:
    """{label: std over states >= 2, averaged over the label's runs}: the noise of retraining one
    ticket, under oneshot only (under geometric the states differ in sparsity)."""
    if schedule != "oneshot":
        return {label: None for label in groups}
    stds = {label: [run_stats(r, n, key)["std"] for r in runs] for label, runs in groups.items()}
    return {label: _mean([s for s in ss if s is not None]) for label, ss in stds.items()}


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
    text = f"{_mean(values):.2f}" + ("%" if metric != "std" else "")
    if len(values) >= 2:
        text += f" ± {statistics.stdev(values):.2f} ({len(values)} seeds)"
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
        if schedule == "oneshot" and s >= 2:
            rows.append((s, cells, None, "– (same ticket, retrained)"))
        else:
            rows.append((s, cells, *decide(values, noise, schedule)))
    return rows


# ---- Markdown -----------------------------------------------------------------------------


def _pct(x, signed=False):
    return "n/a" if x is None else (f"{x:+.2f}" if signed else f"{x:.2f}%")


DELTA = "Δ (best − next)"


def comparison_table(groups, n, schedule="oneshot", key=HEADLINE) -> list:
    rows = comparison(groups, n, schedule, key)
    return fmt.table(["Metric", *groups, DELTA, "Winner"],
                  [[t, *cells.values(), _pct(d, signed=True), v] for _, t, cells, d, v in rows])


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


def per_state(r: Run) -> list:
    rows = [("final test (pruned)", HEADLINE, _num), ("final val (pruned)", "final_val_acc", _num),
            ("best-epoch test", BEST_EPOCH, _num), ("before hard prune (RSST)", "pre_prune_test_acc", _num),
            ("targets' norm at hard prune (RSST)", "target_norm_ratio", _ratio_cell),
            ("start (rewound + pruned)", "start_test_acc", _num), ("params alive", "params_alive", fmt.count)]
    body = [[title, *("" if s.get(key) is None else fmt(s[key]) for s in r.states)] for title, key, fmt in rows
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
        first, last, before = _mean(v[:k]), _mean(v[-k:]), _mean(v[-2 * k:-k])
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
        per_epoch = _mean([e["time_s"] for e in r.epochs if e.get("time_s") is not None])
        rows.append([r.name, fmt.duration(t[0]), fmt.duration(t[1]) if len(t) > 1 else "n/a",
                     fmt.duration(_mean(t[2:])) if len(t) > 2 else "n/a", fmt.duration(sum(t)),
                     fmt.duration(per_epoch) if per_epoch else "n/a"])
    return ["### Training time", ""] + fmt.table(
        ["Run", "State 0", "State 1", "States 2+ (mean per state)", "Total", "Per epoch"], rows) + [""]


# ---- plots --------------------------------------------------------------------------------

def plot(dataset, runs, paths):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colors = {label: f"C{i}" for i, label in enumerate(dict.fromkeys(r.label for r in runs))}
    fig, ax = plt.subplots(figsize=(7, 4))
    flagged = False
    for r in runs:
        x = range(len(r.states))
        ax.plot(x, r.acc(), "o-", color=colors[r.label], label=f"{r.name} final (pruned)")
        ax.plot(x, r.acc(BEST_EPOCH), "x--", color=colors[r.label], alpha=0.5, label=f"{r.name} best epoch")
        bad = [s for s in x if r.not_zeroed(s)]
        if bad:
            ax.plot(bad, [r.acc()[s] for s in bad], "o", ms=12, mfc="none", mec="red",
                    label=None if flagged else f"RSST targets not zeroed (> {NOT_ZEROED:g})")
            flagged = True
    _save(fig, ax, paths["states"], xlabel="state", ylabel="test accuracy (%)", title=f"{dataset}: accuracy per state")

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        ax.plot([e["global_epoch"] for e in r.epochs], [e["val_acc"] for e in r.epochs],
                color=colors[r.label], label=r.name, lw=1)
    epochs = runs[0].epochs
    for before, e in zip(epochs, epochs[1:]):  # state boundaries
        if e["state"] != before["state"]:
            ax.axvline(e["global_epoch"] - 0.5, color="grey", lw=0.5, ls=":")
    _save(fig, ax, paths["epochs"], xlabel="global epoch", ylabel="val accuracy (%)",
          title=f"{dataset}: val accuracy per epoch")


def _save(fig, ax, path, **labels):
    """Integer ticks (states and epochs are counted), labels, legend; write the PNG."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(**labels)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- W&B Report ---------------------------------------------------------------------------

def create_wandb_report(target, tables: dict, title):
    """A W&B Report with, per dataset, the headline table and the runs' curves grouped by method."""
    import wandb_workspaces.reports.v2 as wr
    entity, project = target.split("/")
    blocks = [wr.H1(title), wr.P("Headline: final pruned test accuracy of every state (state/final_test_acc).")]
    for dataset, table in tables.items():
        runs = wr.Runset(entity=entity, project=project, name=dataset,
                         filters=f"Config('dataset') = '{dataset}'", groupby=["group"])
        panels = [wr.LinePlot(title="final pruned test acc", x="state", y=["state/final_test_acc"]),
                  wr.LinePlot(title="best-epoch test acc", x="state", y=["state/best_test_acc"]),
                  wr.LinePlot(title="val acc", x="global_epoch", y=["val_acc"]),
                  wr.LinePlot(title="params alive", x="state", y=["state/params_alive"])]
        blocks += [wr.H2(dataset), wr.MarkdownBlock("\n".join(table)), wr.PanelGrid(runsets=[runs], panels=panels)]
    report = wr.Report(project=project, entity=entity, title=title, blocks=blocks)
    report.save()
    return report.url


def main(*run_dirs, out="report.md", wandb_project=None, wandb_entity=None, wandb_report=None):
    online = resolve_wandb_mode("auto") == "online"
    if wandb_report is not None and not re.fullmatch(r"[^/\s]+/[^/\s]+", str(wandb_report)):
        raise ConfigError(f"--wandb_report: expected ENTITY/PROJECT, got {wandb_report!r}")
    runs = [load_run(d) for d in run_dirs]
    if wandb_project and online:
        runs += load_wandb_runs(wandb_project, wandb_entity)
    elif wandb_project:
        print(f"report: cannot read W&B project {wandb_project!r} offline (no credentials or WANDB_MODE); "
              f"using the run folders only")
    runs = [r for r in runs if r.states]
    if not runs:
        raise ConfigError("report: no run with a finished state; give run folders (RUN_DIR...) "
                          "or --wandb_project with W&B online")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    title = "Structured pruning of ViTs: " + " vs ".join(dict.fromkeys(r.config.get("method", "?") for r in runs))
    lines = [f"# {title}", "",
             "Headline numbers are the **final pruned test accuracy** of each state: the network after the "
             "state's pruning (RSST: after its hard prune). Best-epoch accuracies are shown separately, labelled.", ""]
    lines += fmt.table(["Run", "Dataset", "Method", "Model", "Ratio", "Seed", "States", "Epochs/state", "Status"],
                    [[r.name, *(r.config.get(k) for k in ("dataset", "method", "model", "ratio", "seed")),
                      f"{len(r.states)}/{r.config.get('states', '?')}", r.config.get("epochs"), r.status]
                     for r in runs]) + [""]
    tables = {}  # section title -> headline table, for the W&B Report
    sections = dict.fromkeys((r.config.get("dataset"), r.config.get("schedule", "oneshot")) for r in runs)
    for dataset, schedule in sections:
        subset = [r for r in runs if (r.config.get("dataset"), r.config.get("schedule", "oneshot")) == (dataset, schedule)]
        several = sum(d == dataset for d, _ in sections) > 1
        title, stem = (f"{dataset} — {schedule}", f"{dataset}_{schedule}") if several else (dataset, dataset)
        png = {kind: f"{out.stem}_{stem}_{kind}.png" for kind in ("states", "epochs")}
        lines += dataset_section(title, subset, schedule, png)
        plot(title, subset, {k: out.parent / v for k, v in png.items()})
        tables[title] = comparison_table(configurations(subset), min(len(r.states) for r in subset), schedule)
    out.write_text("\n".join(lines) + "\n")
    print(f"report: wrote {out} and {2 * len(tables)} plots beside it")
    if wandb_report and online:
        print(f"report: W&B report at {create_wandb_report(wandb_report, tables, title)}")
    elif wandb_report:
        print("report: cannot create a W&B Report offline (no credentials or WANDB_MODE); the Markdown is written")
