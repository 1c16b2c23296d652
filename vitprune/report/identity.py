"""What a run is when it is compared with others: its configuration completed with the value each
flag had before it existed, the numerics it resolved, how it retrained after State 0, and whether
two runs of one seed drew the same splits. Imports no torch."""
from vitprune.config import FIELDS, METHODS, NUMERICS_FLAGS, complete, configuration

# A method's own tuning flags (config group "RSST"): variants inside a cell, never a cell of their own.
OWN = frozenset(name for name, f in FIELDS.items() if f.metadata["group"].lower() in METHODS)
# What the run computed with, resolved; records before these were recorded fall back to the flags.
NUMERICS = ("precision", "device_type", "kernels_backend")
# How a run retrains after State 0 (`retraining`): the four ways of the pruning literature.
STRATEGIES = ("weight rewinding", "learning-rate rewinding", "fine-tuning", "scratch")
RETRAINING_FLAGS = ("rewind", "retrain_lr")


def numerics(config: dict, recorded: dict) -> dict:
    """Precision, device type and kernel backend as the run resolved them (its records); records
    written before they were recorded: the flags, resolved where they tell (a Triton backend ran on
    CUDA; `auto` precision is bf16 on CUDA, fp32 on the CPU); `auto` that nothing resolves stays
    `auto`. Other numerics flags (--compile) as given."""
    flag = complete(config).__getitem__
    device = recorded.get("device_type") or flag("device").split(":")[0]
    kernels = recorded.get("kernels_backend") or flag("kernels")
    if device == "auto" and kernels == "triton":
        device = "cuda"
    precision = recorded.get("precision") or flag("precision")
    if precision == "auto" and device != "auto":
        precision = "bf16" if device == "cuda" else "fp32"
    rest = {k: flag(k) for k in sorted(NUMERICS_FLAGS) if k not in ("precision", "device", "kernels")}
    return {"precision": precision, "device_type": device, "kernels_backend": kernels, **rest}


def strategy(config: dict) -> str:
    """Which of STRATEGIES retrains a run's states >= 1: weight rewinding (--rewind=init|epoch:K),
    learning-rate rewinding (--rewind=none), fine-tuning (--rewind=none --retrain_lr), scratch
    (--rewind=random)."""
    c = complete(config)
    if c["rewind"] == "random":
        return "scratch"
    if c["rewind"] == "none":
        return "learning-rate rewinding" if c["retrain_lr"] is None else "fine-tuning"
    return "weight rewinding"


def retraining(config: dict) -> str:
    """How states >= 1 retrain, in words: 'weight rewinding to init', 'fine-tuning at lr=final'."""
    c = complete(config)
    what = strategy(c)
    if what == "weight rewinding":
        what += " to " + ("init" if c["rewind"] == "init" else f"epoch {c['rewind'][6:]}")
    lr = c["retrain_lr"]
    if lr is not None:
        what += f" at lr={lr}" if what == "fine-tuning" else f", constant lr={lr}"
    return what


def identity(config: dict, recorded: dict) -> dict:
    """What a run computes, seed aside: its configuration (completed; --rewind and --retrain_lr as
    its `retraining`) and its numerics. Runs of one identity are seeds of one configuration."""
    c = complete(config)
    what = {k: v for k, v in configuration(c).items() if k not in RETRAINING_FLAGS}
    return {**what, "retraining": retraining(c), **numerics(c, recorded)}


def fingerprints_agree(a, b) -> bool:
    """Two runs of one seed drew the same val and test images (their `split_fingerprint`s agree);
    records without one (written before it was recorded) are taken to."""
    return a is None or b is None or a == b


def pair_by_seed(runs_a, runs_b):
    """({seed: (run of a, run of b)} of the seeds both have whose splits agree, [(seed, run of a,
    run of b)] refused: their split fingerprints differ)."""
    a, b = ({r.config.get("seed"): r for r in runs} for runs in (runs_a, runs_b))
    pairs, refused = {}, []
    for seed in sorted(a.keys() & b.keys(), key=str):
        if fingerprints_agree(a[seed].split, b[seed].split):
            pairs[seed] = (a[seed], b[seed])
        else:
            refused.append((seed, a[seed], b[seed]))
    return pairs, refused
