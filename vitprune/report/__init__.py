"""`python -m vitprune report`: Markdown tables + PNG plots comparing runs (run folders or a W&B
project), in layers: runs (reading) -> stats, policy, compute (numbers, verdict policy) ->
markdown, plots, wandb_report."""
import re
from pathlib import Path

from vitprune.config import ConfigError, dataset_name
from vitprune.log import resolve_wandb_mode
from vitprune.report import markdown, plots
from vitprune.report.markdown import comparison
from vitprune.report.compute import cell_groups, compute_cells, equal_compute, equal_compute_keys
from vitprune.report.policy import Verdicts, cells, configurations, decide
from vitprune.report.runs import RunRecords, load_run, read_runs
from vitprune.report.stats import paired_test, run_stats
from vitprune.report.wandb_report import create_wandb_report

__all__ = ["main", "RunRecords", "load_run", "run_stats", "configurations", "cells", "decide", "paired_test",
           "Verdicts", "comparison"]


def main(*run_dirs, out="report.md", wandb_project=None, wandb_entity=None, wandb_report=None):
    online = resolve_wandb_mode("auto") == "online"
    if wandb_report is not None and not re.fullmatch(r"[^/\s]+/[^/\s]+", str(wandb_report)):
        raise ConfigError(f"--wandb_report: expected ENTITY/PROJECT, got {wandb_report!r}")
    runs = read_runs(run_dirs, wandb_project, wandb_entity, online)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    title = "Structured pruning of ViTs: " + " vs ".join(dict.fromkeys(r.config.get("method", "?") for r in runs))
    lines = markdown.heading(title, runs)
    section_of = lambda r: (r.config.get("dataset"), r.config.get("schedule", "oneshot"))
    sections = {key: [r for r in runs if section_of(r) == key] for key in dict.fromkeys(map(section_of, runs))}
    section_cells = {key: cells(subset) for key, subset in sections.items()}
    compute = compute_cells(runs)  # the equal-compute view: cells whatever the loop's shape
    equal_rows = [equal_compute(with_) for _, with_, _ in compute]
    verdicts = Verdicts([c for cs in section_cells.values() for c in cs],  # Holm over the whole report
                        equal_compute_keys([row for rows in equal_rows for row in rows]))
    tables, figures = {}, 0  # section title -> headline tables, for the W&B Report; PNGs written
    for (dataset, schedule), subset in sections.items():
        several = sum(d == dataset for d, _ in sections) > 1
        name = f"{dataset} — {schedule}" if several else dataset  # `title` stays the report's: the W&B Report's
        stem = f"{file_stem(dataset)}_{schedule}" if several else file_stem(dataset)
        png = {kind: f"{out.stem}_{stem}_{kind}.png" for kind in ("states", "epochs")}
        lines += markdown.dataset_section(name, subset, section_cells[(dataset, schedule)], verdicts, png)
        plots.plot(name, subset, {k: out.parent / v for k, v in png.items()})
        diagnostics = rsst_figures(name, subset, out, stem)
        lines += diagnostics
        figures += len(png) + sum(line.startswith("![") for line in diagnostics)
        tables[name] = [line for c in section_cells[(dataset, schedule)]
                         for line in [f"**{c.name or dataset}**", ""] + markdown.comparison_table(c, verdicts) + [""]]
    pngs = [f"{out.stem}_compute{'' if len(compute) == 1 else i + 1}.png" for i in range(len(compute))]
    lines += markdown.compute_section(compute, equal_rows, verdicts, pngs)
    for (cell_title, with_, _), png in zip(compute, pngs):
        if with_:
            plots.compute_plot(cell_title, cell_groups(with_), out.parent / png)
            figures += 1
    out.write_text("\n".join(lines) + "\n")
    print(f"report: wrote {out} and {figures} plots beside it")
    if wandb_report and online:
        print(f"report: W&B report at {create_wandb_report(wandb_report, tables, title)}")
    elif wandb_report:
        print("report: cannot create a W&B Report offline (no credentials or WANDB_MODE); the Markdown is written")


def file_stem(dataset) -> str:
    """A file-name-safe name of the data set: folder:/data/flowers -> flowers."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", dataset_name(str(dataset))).strip("-.") or "data"


def rsst_figures(title, runs, out: Path, stem: str) -> list:
    """RSST's diagnostics figure per RSST configuration of a section, and its Markdown."""
    lines = []
    rsst = {label: group for label, group in configurations(runs).items()
            if any(e.get("target_norm_ratio") is not None for r in group for e in r.epochs)}
    for i, (label, group) in enumerate(rsst.items()):
        png = f"{out.stem}_{stem}_rsst{i}.png"
        plots.rsst_diagnostics(f"{title} — {label}", group, out.parent / png)
        lines += markdown.rsst_diagnostics(label, png)
    return lines
