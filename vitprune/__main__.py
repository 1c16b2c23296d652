"""Command line: python -m vitprune run|report|sweep|bench|export|info (Fire).

Bad input ends with one line naming the flag and the valid values, exit code 2; a full disk
with one line, exit 75; a run folder another process holds with one line naming it, exit 73.
"""
import functools
import inspect
import os
import sys
import textwrap

import fire

from vitprune.config import FIELDS, base_type, from_flags
from vitprune.errors import ConfigError, RunLocked
from vitprune.files import DiskFull
from vitprune.runfolder import claim, resumed_config, run_name

# --help and the flags page (docs/flags.md), both from the fields' metadata
GROUPS = ("experiment", "pruning", "RSST", "optimisation", "system", "logging")
FLAGS_PAGE_COMMAND = "python -m vitprune run --help --markdown > docs/flags.md"


def default_text(value) -> str:
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else f"{value:g}" \
        if isinstance(value, float) else str(value)


def values_text(name: str) -> str:
    """The valid values of a flag as --help and docs/flags.md show them."""
    f = FIELDS[name]
    meta = f.metadata
    if meta["choices"]:
        text = ", ".join(meta["choices"])
    elif meta["range"]:
        text = str(meta["range"])
    else:
        text = {bool: "true, false", int: "integer", float: "number", str: "text"}[base_type(f)]
    if meta["requires"]:
        text += "; only with " + " and ".join(f"--{k}={'|'.join(v)}" for k, v in meta["requires"].items())
    return text


def help_text() -> str:
    """`python -m vitprune run --help`: every flag, grouped, with its default and valid values."""
    lines = ["usage: python -m vitprune run [--flag=value ...]", "",
             "The state loop: state 0 trains the dense ViT, every later state selects the heads and neurons to",
             "keep, rewinds and retrains. Defaults are the seed's experiment. States and epochs count from 0.",
             "`--help --markdown` prints these flags as the Markdown of docs/flags.md."]
    for group in GROUPS:
        lines += ["", f"{group}:"]
        for name, f in FIELDS.items():
            if f.metadata["group"] == group:
                lines.append(f"  {'--' + name + '=' + default_text(f.default):<32} {values_text(name)}")
                lines += textwrap.wrap(f.metadata["help"], 96, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


def flags_page() -> str:
    """docs/flags.md: every flag as a Markdown table per group, from the same source as --help;
    `python -m vitprune run --help --markdown` prints it."""
    cell = lambda text: text.replace("|", "\\|")
    lines = ["# Flags", "",
             "Every flag of `python -m vitprune run`: its default, valid values and what it does. "
             "Back to the [README](../README.md).", "",
             "Generated from the fields of `vitprune/config.py`, which are also the source of `--help` and of the",
             "validation; `tests/test_docs.py` fails when this page is stale. After changing a flag, regenerate it:",
             "", "```bash", FLAGS_PAGE_COMMAND, "```", "",
             "Bad input and the flags a run refuses are described under [bad input](runs.md#bad-input); what the",
             "methods' flags do, under [the state loop and the methods](method.md)."]
    for group in GROUPS:
        lines += ["", f"## {group}", "", "| flag | default | values | what it does |", "|---|---|---|---|"]
        lines += [f"| `--{name}` | `{default_text(f.default)}` | {cell(values_text(name))} | "
                  f"{cell(f.metadata['help'])} |" for name, f in FIELDS.items() if f.metadata["group"] == group]
    return "\n".join(lines)


def run(*args, **flags):
    """Run the state loop. Flags are the fields of vitprune.config.Config, e.g.
    --method=rsst --dataset=cifar100 --ratio=0.7 --states=16 --epochs=60; --help lists them."""
    if flags.keys() & {"help", "h"}:
        print(flags_page() if flags.get("markdown") else help_text())
        return
    if args:
        raise ConfigError(f"{args[0]!r}: stray argument; every setting is a flag, --name=value "
                          f"(`python -m vitprune run --help` lists them)")
    cfg = from_flags(flags)  # every check that needs no torch: a bad command fails in about a second
    if cfg.name is None and os.environ.get("WANDB_SWEEP_ID") and os.environ.get("WANDB_RUN_ID"):
        # Under `wandb agent` a grid over a flag the default name does not show (e.g. lr) would
        # send several runs to one folder: the W&B run id keeps them apart.
        cfg.name = f"{run_name(cfg)}_{os.environ['WANDB_RUN_ID']}"
    if cfg.resume:
        cfg = resumed_config(cfg, flags)
        if cfg is None:
            return
    folder = claim(cfg)  # before torch loads, like the flags
    from vitprune.train import run as run_loop
    run_loop(cfg, folder)


def report(*run_dirs, out="report.md", wandb_project=None, wandb_entity=None, wandb_report=None):
    """Seed-style Markdown report (+ PNG plots) comparing run folders."""
    from vitprune.report import main
    main(*run_dirs, out=out, wandb_project=wandb_project, wandb_entity=wandb_entity, wandb_report=wandb_report)


def sweep(path, dry_run=False, out_dir="runs"):
    """Run a W&B grid sweep YAML locally, one run after another (resumable)."""
    from vitprune.sweep import main
    main(path, dry_run=dry_run, out_dir=out_dir)


def info():
    """Versions of torch/timm/triton/wandb and the devices this machine offers."""
    import platform

    import torch
    from vitprune import kernels
    lines = [f"python  {platform.python_version()}", f"torch   {torch.__version__}"]
    for name in ("torchvision", "timm", "triton", "wandb", "fire"):
        try:
            lines.append(f"{name:<7} {__import__(name).__version__}")
        except Exception:
            lines.append(f"{name:<7} not installed")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i}  {p.name}, {p.total_memory / 2**30:.0f} GiB")
    else:
        lines.append("cuda    not available (CPU only)")
    lines.append(f"kernels auto -> {kernels.resolve_backend('auto', 'cuda' if torch.cuda.is_available() else 'cpu')}")
    from vitprune.log import has_wandb_credentials, resolve_wandb_mode
    lines.append(f"wandb   --wandb=auto -> {resolve_wandb_mode('auto')} "
                 f"({'credentials found' if has_wandb_credentials() else 'no credentials'})")
    print("\n".join(lines))


def export(checkpoint, out, push=None, private=False):
    """Write a physically smaller timm ViT (alive heads and neurons only) from a checkpoint.

    CHECKPOINT: a run's checkpoints/state_XX.pt. --out=DIR: the folder written (new, empty, or
    an earlier export, replaced whole): model.safetensors + config.json, model.pt2, model.onnx,
    README.md (the model card). --push=ORG/NAME: then upload what DIR holds to that Hugging Face
    Hub model repository in one commit (needs a login: `hf auth login` or HF_TOKEN; without one,
    or without a network, nothing is written); vitprune.load_exported("hf-hub:ORG/NAME") loads
    it. --private: a repository the push creates is private.
    """
    from vitprune.deploy import export as export_checkpoint
    export_checkpoint(checkpoint, out, push, private)


def _command(fn):
    """`fn` as a Fire command: where it takes a tuple, one value becomes a 1-tuple (Fire reads
    --batches=128 as 128, --batches=128,512 as a tuple); it prints, so its return value is dropped."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)  # Fire reads the signature and doc of `fn` through __wrapped__
    def command(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        for key, value in bound.arguments.items():
            if isinstance(signature.parameters[key].default, tuple):
                bound.arguments[key] = tuple(value) if isinstance(value, (tuple, list)) else (value,)
        fn(*bound.args, **bound.kwargs)
    return command


def bench():
    """Side-by-side benchmarks (vitprune/bench/): kernels, train, export, images."""
    from vitprune import bench as benchmarks
    return {name: _command(getattr(benchmarks, f"bench_{name}")) for name in ("kernels", "train", "export", "images")}


def main():
    commands = {"run": run, "report": report, "sweep": sweep, "export": export, "info": info, "bench": bench}
    try:
        fire.Fire(commands, name="vitprune")
    except (ConfigError, DiskFull, RunLocked) as e:  # one line, and an exit code per kind
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.EXIT_CODE)


if __name__ == "__main__":
    main()
