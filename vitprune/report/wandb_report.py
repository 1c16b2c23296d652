"""The optional W&B Report: the report's headline tables beside the runs' live curves in W&B
(the `report` extra, wandb_workspaces)."""


def create_wandb_report(target, sections: list, title):
    """A W&B Report with, per section of the report (a dataset, or a dataset and schedule), the
    headline table and the runs' curves grouped by method; sections: [(title, dataset, schedule or
    None where the dataset has one schedule, Markdown lines)]. Returns its URL."""
    import wandb_workspaces.reports.v2 as wr
    entity, project = target.split("/")
    blocks = [wr.H1(title), wr.P("Headline: final pruned test accuracy of every state (state/final_test_acc).")]
    for name, dataset, schedule, table in sections:
        only = f"Config('dataset') = {dataset!r}"
        only += "" if schedule is None else f" and Config('schedule') = {schedule!r}"
        runs = wr.Runset(entity=entity, project=project, name=name, filters=only, groupby=["group"])
        panels = [wr.LinePlot(title="final pruned test acc", x="state", y=["state/final_test_acc"]),
                  wr.LinePlot(title="best-epoch test acc", x="state", y=["state/best_test_acc"]),
                  wr.LinePlot(title="val acc", x="global_epoch", y=["val_acc"]),
                  wr.LinePlot(title="params alive", x="state", y=["state/params_alive"]),
                  wr.LinePlot(title="final pruned test acc vs training FLOPs", x="state/train_flops",
                              y=["state/final_test_acc"])]
        blocks += [wr.H2(name), wr.MarkdownBlock("\n".join(table)), wr.PanelGrid(runsets=[runs], panels=panels)]
    report = wr.Report(project=project, entity=entity, title=title, blocks=blocks)
    report.save()
    return report.url
