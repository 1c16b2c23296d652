"""`python -m vitprune report`: Markdown tables + PNG plots comparing runs (run folders or a W&B
project), in layers: runs (reading) -> stats (numbers, verdict policy) -> markdown and plots."""
import re
from pathlib import Path

from vitprune.config import ConfigError
from vitprune.log import resolve_wandb_mode
from vitprune.report import markdown, plots
from vitprune.report.markdown import comparison
from vitprune.report.runs import RunRecords, load_run, read_runs
from vitprune.report.stats import cell_groups, compute_cells, configurations, decide, paired_test, run_stats

__all__ = ["main", "RunRecords", "load_run", "run_stats", "configurations", "decide", "comparison", "paired_test"]


def main(*run_dirs, out="report.md", wandb_project=None, wandb_entity=None, wandb_report=None):
    online = resolve_wandb_mode("auto") == "online"
    if wandb_report is not None and not re.fullmatch(r"[^/\s]+/[^/\s]+", str(wandb_report)):
        raise ConfigError(f"--wandb_report: expected ENTITY/PROJECT, got {wandb_report!r}")
    runs = read_runs(run_dirs, wandb_project, wandb_entity, online)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    title = "Structured pruning of ViTs: " + " vs ".join(dict.fromkeys(r.config.get("method", "?") for r in runs))
    lines = markdown.heading(title, runs)
    tables = {}  # section title -> headline table, for the W&B Report
    sections = dict.fromkeys((r.config.get("dataset"), r.config.get("schedule", "oneshot")) for r in runs)
    for dataset, schedule in sections:
        subset = [r for r in runs if (r.config.get("dataset"), r.config.get("schedule", "oneshot")) == (dataset, schedule)]
        several = sum(d == dataset for d, _ in sections) > 1
        title, stem = (f"{dataset} — {schedule}", f"{dataset}_{schedule}") if several else (dataset, dataset)
        png = {kind: f"{out.stem}_{stem}_{kind}.png" for kind in ("states", "epochs")}
        lines += markdown.dataset_section(title, subset, schedule, png)
        plots.plot(title, subset, {k: out.parent / v for k, v in png.items()})
        tables[title] = markdown.comparison_table(configurations(subset), min(len(r.states) for r in subset), schedule)
    cells = compute_cells(runs)
    pngs = [f"{out.stem}_compute{'' if len(cells) == 1 else i + 1}.png" for i in range(len(cells))]
    lines += markdown.compute_section(cells, pngs)
    drawn = [plots.compute_plot(title, cell_groups(with_), out.parent / png)
             for (title, with_, _), png in zip(cells, pngs) if with_]
    out.write_text("\n".join(lines) + "\n")
    print(f"report: wrote {out} and {2 * len(tables) + len(drawn)} plots beside it")
    if wandb_report and online:
        print(f"report: W&B report at {plots.create_wandb_report(wandb_report, tables, title)}")
    elif wandb_report:
        print("report: cannot create a W&B Report offline (no credentials or WANDB_MODE); the Markdown is written")

