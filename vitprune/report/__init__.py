"""`python -m vitprune report`: Markdown tables + PNG plots comparing runs (run folders or a W&B
project), in layers: runs (reading) -> stats, policy, compute (numbers, verdict policy) -> analysis
(every number the report shows, computed first) -> markdown, plots, wandb_report (rendering)."""
import re
from pathlib import Path

from vitprune.config import dataset_name
from vitprune.errors import ConfigError
from vitprune.log import resolve_wandb_mode
from vitprune.report import markdown, plots
from vitprune.report.analysis import Analysis, analyse, cell_tables
from vitprune.report.markdown import comparison
from vitprune.report.policy import Verdicts, cells, configurations, decide
from vitprune.report.runs import RunRecords, load_run, read_runs
from vitprune.report.stats import paired_test, run_stats
from vitprune.report.wandb_report import create_wandb_report

__all__ = ["main", "RunRecords", "load_run", "run_stats", "configurations", "cells", "decide", "paired_test",
           "Verdicts", "analyse", "Analysis", "cell_tables", "comparison"]


def main(*run_dirs, out="report.md", wandb_project=None, wandb_entity=None, wandb_report=None):
    online = resolve_wandb_mode("auto") == "online"
    if wandb_report is not None and not re.fullmatch(r"[^/\s]+/[^/\s]+", str(wandb_report)):
        raise ConfigError(f"--wandb_report: expected ENTITY/PROJECT, got {wandb_report!r}")
    runs = read_runs(run_dirs, wandb_project, wandb_entity, online)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    title = "Structured pruning of ViTs: " + " vs ".join(dict.fromkeys(r.config.get("method", "?") for r in runs))
    numbers = analyse(runs)
    lines = markdown.heading(title, runs, numbers)
    tables, figures = [], 0  # per section its headline tables, for the W&B Report; PNGs written
    for section in numbers.sections:
        stem = file_stem(section.dataset) + (f"_{section.schedule}" if section.several else "")
        png = {kind: f"{out.stem}_{stem}_{kind}.png" for kind in ("states", "epochs")}
        lines += markdown.dataset_section(section, numbers.tests, png, numbers.one_seed)
        plots.plot(section.title, [x.run for x in section.runs], {k: out.parent / v for k, v in png.items()})
        diagnostics = rsst_figures(section.title, section.rsst, out, stem)
        lines += diagnostics
        figures += len(png) + sum(line.startswith("![") for line in diagnostics)
        tables.append((section.title, section.dataset, section.schedule if section.several else None,
                       markdown.headline_tables(section, numbers.tests)))
    pngs = [f"{out.stem}_compute{'' if len(numbers.compute) == 1 else i + 1}.png" for i in range(len(numbers.compute))]
    lines += markdown.compute_section(numbers.compute, pngs)
    for cell, png in zip(numbers.compute, pngs):
        if cell.runs:
            plots.compute_plot(cell.title, cell.curves, out.parent / png)
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


def rsst_figures(title, rsst: dict, out: Path, stem: str) -> list:
    """RSST's diagnostics figure per RSST configuration of a section ({label: [runs]}), and its Markdown."""
    lines = []
    for i, (label, group) in enumerate(rsst.items()):
        png = f"{out.stem}_{stem}_rsst{i}.png"
        plots.rsst_diagnostics(f"{title} — {label}", group, out.parent / png)
        lines += markdown.rsst_diagnostics(label, png)
    return lines
