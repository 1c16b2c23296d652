"""The run configuration: one dataclass, defaults = the seed's experiment, validation.

Every field is a command-line flag of `python -m vitprune run` with the same name.
Validation happens before anything touches the disk.
"""
import dataclasses
import os
from dataclasses import dataclass
from typing import Optional

METHODS = ("refill", "rsst", "imp", "dense")
DATASETS = ("cifar10", "cifar100", "synthetic")
MODELS = ("vit_small", "vit_tiny", "vit_base", "vit_micro")
TARGETS = ("both", "heads", "mlp")
CRITERIA = ("magnitude", "l1", "l2", "remain", "saliency", "random")
SORTINGS = ("global", "layerwise")
SCHEDULES = ("oneshot", "geometric")
OPTIMIZERS = ("sgd", "adamw")
LR_SCHEDULES = ("multistep", "cosine", "constant")
REG_SCHEDULES = ("x", "x^2", "x^3", "exp", "exp_custom", "exp_custom_exponents")
REG_KINDS = ("l2", "group_lasso")
KERNELS = ("auto", "triton", "torch")
PRECISIONS = ("auto", "fp32", "bf16")
WANDB_MODES = ("auto", "online", "offline", "disabled")


class ConfigError(ValueError):
    """Bad user input: the message is one line naming the flag and the valid values."""


@dataclass
class Config:
    # what to run
    method: str = "refill"
    dataset: str = "cifar10"
    model: str = "vit_small"
    pretrained: Optional[str] = None     # timm model name or local weights file
    # how much to prune
    ratio: float = 0.7                   # fraction of groups removed (heads and neurons)
    head_ratio: Optional[float] = None   # overrides ratio for attention heads
    mlp_ratio: Optional[float] = None    # overrides ratio for MLP neurons
    target: str = "both"                 # which kinds of groups are pruned
    min_keep: int = 1                    # groups of each kind every layer keeps
    # the state loop
    states: int = 16
    epochs: int = 60
    schedule: str = "oneshot"            # keep fraction per state
    rewind: str = "init"                 # init | epoch:K | none
    criterion: str = "magnitude"
    sorting: str = "global"
    calib_batches: int = 8               # training batches for activation criteria
    # RSST
    reg_schedule: str = "exp_custom_exponents"
    reg_granularity_prune: float = 1.0
    exponents: float = 4.0
    reg_kind: str = "l2"
    # optimisation (the seed's recipe; AdamW + cosine is the from-scratch recipe)
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_schedule: str = "multistep"       # multistep: x0.1 at 50% and 75% of the state
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    batch_size: int = 128
    # execution
    kernels: str = "auto"
    precision: str = "auto"
    compile: bool = False
    device: str = "auto"
    seed: int = 0
    # files and logging
    data_dir: str = "data"
    out_dir: str = "runs"
    name: Optional[str] = None           # run folder name; derived from the config when None
    wandb: str = "auto"
    wandb_project: str = "vitprune"
    wandb_entity: Optional[str] = None
    resume: bool = False
    overwrite: bool = False

    @property
    def head_prune(self) -> float:
        """Fraction of heads removed in the final state."""
        if self.target == "mlp":
            return 0.0
        return self.ratio if self.head_ratio is None else self.head_ratio

    @property
    def mlp_prune(self) -> float:
        if self.target == "heads":
            return 0.0
        return self.ratio if self.mlp_ratio is None else self.mlp_ratio

    @property
    def run_name(self) -> str:
        return self.name or f"{self.dataset}_{self.method}_{self.model}_r{self.ratio:g}_s{self.seed}"

    @property
    def rewind_epoch(self) -> Optional[int]:
        """Epoch of state 0 whose end is the rewind point (0 = the initial weights), None = no rewind."""
        if self.rewind == "none":
            return None
        if self.rewind == "init":
            return 0
        return int(self.rewind.split(":", 1)[1])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def _choice(flag, value, choices):
    if value not in choices:
        raise ConfigError(f"--{flag}: unknown value {value!r}; choose from {', '.join(choices)}")


def _number(flag, value, kind, lo=None, hi=None, lo_open=False, hi_open=False, what=""):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise ConfigError(f"--{flag}: expected {'an integer' if kind is int else 'a number'}{what}, got {value!r}")
    if (lo is not None and (value < lo or (lo_open and value == lo))) or \
       (hi is not None and (value > hi or (hi_open and value == hi))):
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        lo_s = "-inf" if lo is None else f"{lo:g}"
        hi_s = "inf" if hi is None else f"{hi:g}"
        raise ConfigError(f"--{flag}: {value!r} is outside {left}{lo_s}, {hi_s}{right}{what}")


def validate(cfg: Config) -> Config:
    """Check every flag; raise ConfigError with one line naming the flag and valid values."""
    _choice("method", cfg.method, METHODS)
    _choice("dataset", cfg.dataset, DATASETS)
    _choice("model", cfg.model, MODELS)
    _choice("target", cfg.target, TARGETS)
    _choice("criterion", cfg.criterion, CRITERIA)
    _choice("sorting", cfg.sorting, SORTINGS)
    _choice("schedule", cfg.schedule, SCHEDULES)
    _choice("optimizer", cfg.optimizer, OPTIMIZERS)
    _choice("lr_schedule", cfg.lr_schedule, LR_SCHEDULES)
    _choice("reg_schedule", cfg.reg_schedule, REG_SCHEDULES)
    _choice("reg_kind", cfg.reg_kind, REG_KINDS)
    _choice("kernels", cfg.kernels, KERNELS)
    _choice("precision", cfg.precision, PRECISIONS)
    _choice("wandb", cfg.wandb, WANDB_MODES)
    for flag in ("ratio", "head_ratio", "mlp_ratio"):
        value = getattr(cfg, flag)
        if value is not None:
            _number(flag, value, float, 0.0, 1.0, hi_open=True, what=" (fraction of groups removed)")
    _number("states", cfg.states, int, 1, what=" (at least 1)")
    _number("epochs", cfg.epochs, int, 1, what=" (at least 1)")
    _number("batch_size", cfg.batch_size, int, 1, what=" (at least 1)")
    _number("min_keep", cfg.min_keep, int, 1, what=" (at least 1 group per layer)")
    _number("calib_batches", cfg.calib_batches, int, 1, what=" (at least 1)")
    _number("lr", cfg.lr, float, 0.0, lo_open=True, what=" (positive)")
    _number("momentum", cfg.momentum, float, 0.0, 1.0, hi_open=True)
    _number("weight_decay", cfg.weight_decay, float, 0.0)
    _number("label_smoothing", cfg.label_smoothing, float, 0.0, 1.0, hi_open=True)
    _number("warmup_epochs", cfg.warmup_epochs, int, 0)
    _number("reg_granularity_prune", cfg.reg_granularity_prune, float, 0.0, what=" (non-negative)")
    _number("exponents", cfg.exponents, float, 0.0, lo_open=True, what=" (positive)")
    _number("seed", cfg.seed, int)
    if cfg.rewind not in ("init", "none"):
        k = cfg.rewind.split(":", 1)[1] if isinstance(cfg.rewind, str) and cfg.rewind.startswith("epoch:") else ""
        if not k.isdigit() or int(k) > cfg.epochs:
            raise ConfigError(f"--rewind: {cfg.rewind!r} is not valid; choose from init, none, "
                              f"epoch:K with 0 <= K <= --epochs ({cfg.epochs})")
    if not (cfg.device in ("auto", "cpu", "cuda") or str(cfg.device).startswith("cuda:")):
        raise ConfigError(f"--device: unknown value {cfg.device!r}; choose from auto, cpu, cuda, cuda:N")
    if cfg.resume and cfg.overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: --resume continues the run "
                          "folder, --overwrite replaces it")
    if cfg.name is not None and (not str(cfg.name) or os.sep in str(cfg.name) or str(cfg.name) in (".", "..")):
        raise ConfigError(f"--name: {cfg.name!r} is not a folder name")
    if cfg.pretrained is not None:
        _check_pretrained(str(cfg.pretrained))
    return cfg


def _check_pretrained(spec: str):
    """A path must be a readable file; anything else must be a timm model name."""
    looks_like_path = os.sep in spec or spec.endswith((".pth", ".pt", ".bin", ".safetensors"))
    if looks_like_path:
        if not os.path.isfile(spec) or not os.access(spec, os.R_OK):
            raise ConfigError(f"--pretrained: cannot read file {spec!r}; give a readable .safetensors/.pth/"
                              f".pt/.bin file or a timm model name")
        return
    import timm
    if not timm.is_model(spec.split(".", 1)[0]):
        raise ConfigError(f"--pretrained: {spec!r} is neither a file nor a timm model name "
                          f"(e.g. vit_small_patch16_224.augreg_in21k_ft_in1k)")


def from_flags(flags: dict) -> Config:
    """Build and validate a Config from command-line flags (names exactly as the fields)."""
    unknown = sorted(set(flags) - set(FIELDS))
    if unknown:
        raise ConfigError(f"--{unknown[0]}: unknown flag; valid flags: {', '.join('--' + f for f in FIELDS)}")
    values = {}
    for key, value in flags.items():
        default = FIELDS[key].default
        # Fire turns --ratio=1 into int, --head_ratio=None into None: coerce to the field's type.
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if key in ("head_ratio", "mlp_ratio") and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if key in ("name", "pretrained", "data_dir", "out_dir", "wandb_project", "wandb_entity", "rewind", "device") \
                and value is not None and not isinstance(value, str):
            value = str(value)
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ConfigError(f"--{key}: expected true or false, got {value!r}")
        values[key] = value
    return validate(Config(**values))
