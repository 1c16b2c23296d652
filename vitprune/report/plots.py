"""The report's figures: PNG plots of accuracy per state and per epoch, of accuracy against
training compute (from its computed curves), and of RSST's diagnostics over a state."""
from vitprune.config import NOT_ZEROED
from vitprune.report.runs import BEST_EPOCH


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


# How each way of retraining is drawn: the ticket loop solid, the baselines dashed, a marker each.
STYLE = {"weight rewinding": "o-", "learning-rate rewinding": "s--", "fine-tuning": "^--", "scratch": "D:"}


def compute_plot(title, curves: list, path):
    """Test accuracy (final pruned) against the cumulative training FLOPs at the end of each state,
    one curve per configuration (compute.Curve: mean over its seeds, std as error bars), drawn by
    how it retrains (STYLE)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, c in enumerate(curves):
        ax.errorbar(c.flops, c.acc, yerr=c.err, fmt=STYLE.get(c.strategy, "o-"), color=f"C{i}", capsize=3,
                    label=f"{c.label} ({c.runs} run{'s' * (c.runs > 1)})")
    _save(fig, ax, path, integer_x=False, xlabel="cumulative training compute (FLOPs)",
          ylabel="test accuracy (%), final pruned", title=f"{title}: accuracy vs training compute")


def _save(fig, ax, path, integer_x=True, **labels):
    """Integer ticks where x counts (states, epochs), labels, legend; write the PNG."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(**labels)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- RSST's diagnostics over a state ------------------------------------------------------------

RSST_SERIES = ("LR ÷ base LR", "penalty coefficient ÷ its largest", "‖w_T‖ ratio (all targets)",
               "largest target group's ratio", "val acc without the targets (%)")


def rsst_diagnostics(title, runs, path, state=1) -> list:
    """One figure over RSST's state `state` (x: its progress 0..1; one line per run): above, the
    LR, the penalty coefficient and the targets' norm ratios (all of them, the largest group),
    with the hard prune; below, the val accuracy of the network without its targets. Shows
    when the pull happens relative to the LR. Returns the labels of the series drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    drawn = {}
    for r in runs:
        rows = [e for e in r.epochs if e["state"] == state]
        start = r.states[state] if state < len(r.states) else {}
        if not rows or rows[0].get("target_norm_ratio") is None:
            continue
        x = [e.get("state_progress", (i + 1) / len(rows)) for i, e in enumerate(rows)]
        top_k = max(e["reg_lambda"] for e in rows) or 1.0
        base_lr = r.config.get("lr") or max(e["lr"] for e in rows)
        series = [(top, RSST_SERIES[0], x, [e["lr"] / base_lr for e in rows], "C0"),
                  (top, RSST_SERIES[1], x, [e["reg_lambda"] / top_k for e in rows], "C1"),
                  (top, RSST_SERIES[2], [0, *x], [1.0, *(e["target_norm_ratio"] for e in rows)], "C2"),
                  (top, RSST_SERIES[3], [0, *x], [1.0, *(e.get("target_norm_ratio_max") for e in rows)], "C3"),
                  (bottom, RSST_SERIES[4], [0, *x], [start.get("start_val_acc"), *(e["val_acc"] for e in rows)], "C4")]
        for ax, label, xs, ys, color in series:
            points = [(a, b) for a, b in zip(xs, ys) if b is not None]
            if points:
                ax.plot(*zip(*points), "o-", ms=3, lw=1, color=color, label=None if label in drawn else label)
                drawn[label] = True
        if start.get("pruned_at") is not None:
            top.axvline(start["pruned_at"], color="red", lw=0.8, ls="--", label=None if "hard prune" in drawn
                        else "hard prune")
            bottom.axvline(start["pruned_at"], color="red", lw=0.8, ls="--")
            drawn["hard prune"] = True
    top.axhline(NOT_ZEROED, color="grey", lw=0.5, ls=":")  # the ratio above which a state is flagged
    top.set_title(f"{title}\nRSST state {state}, one line per run", fontsize=9)
    top.set(ylabel="ratio")
    bottom.set(xlabel=f"progress of state {state}", ylabel="val acc (%)", xlim=(0, 1))
    top.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return list(drawn)
