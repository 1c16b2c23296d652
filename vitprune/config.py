"""The run configuration: one dataclass, defaults = the seed's experiment, validation.

Every field is a command-line flag of `python -m vitprune run` with the same name. What is
known about a flag (its group, its help line, its valid values or range, whether it only
says how to execute rather than what to compute, which methods it applies to) lives in the
field's metadata here, and everything else (validation, resume, reports, sweeps, W&B
grouping) reads it from there.

`from_flags` checks every flag before torch loads, so a bad command fails in about a second:
the values, their combinations, and against the filesystem and the Hub (folders, image
folders, --pretrained; the probes live beside what loads them: files.check_folder,
data.checks, hub.check_pretrained). What must wait for torch is checked when it loads: CUDA
for --device=cuda, the Triton kernels' self-check, the weights timm loads, the images a
folder holds, a training set smaller than a batch, a --distill file's tensors.
"""
import dataclasses
import difflib
import math
import os
from dataclasses import dataclass
from typing import Optional, get_args

from vitprune.data.checks import MAX_IMAGE_PIXELS, check_data_flags
from vitprune.errors import ConfigError
from vitprune.flags import BEFORE, flag
from vitprune.files import check_folder
from vitprune.hub import check_pretrained
from vitprune.zoo import ALIASES

METHODS = ("refill", "rsst", "imp", "dense")
STRUCTURED = {"method": ("refill", "rsst")}  # the methods that prune whole heads and neurons
RSST = {"method": ("rsst",)}
FINETUNE = {"aug": ("finetune",)}
RETRAIN = {"rewind": ("init", "none", "random")}  # a new schedule for states >= 1 (not late rewinding's)
# An RSST state whose targets keep more than this share of their norm at the hard prune was
# not driven to zero: the run warns and the report flags it.
NOT_ZEROED = 0.1


@dataclass
class Config:
    # experiment
    method: str = flag("refill", "refill: remove at once, retrain; rsst: regularise the doomed groups to zero, "
                       "then remove them; imp: unstructured lottery ticket; dense: no pruning (noise floor)",
                       "experiment", choices=METHODS)
    dataset: str = flag("cifar10", "cifar10 and cifar100 through torchvision; synthetic: built in, offline; "
                        "folder:PATH: your own images in torchvision's ImageFolder layout", "experiment",
                        choices=("cifar10", "cifar100", "synthetic", "folder:PATH"))
    val_size: float = flag(0.1, "validation images carved from the training set with the seed: a fraction "
                           "(below 1) or an image count (1 or more)", "experiment", range="(0, inf)")
    img_size: int = flag(32, "side of the images the model sees (CIFAR is resized per batch on the device); "
                         "with --pretrained the default is the weights' input size", "experiment", range="[1, inf)")
    patch_size: int = flag(4, "side of the model's patches; divides --img_size; the default is 4 for an alias "
                           "from scratch, else the timm model's own", "experiment", range="[1, inf)")
    model: str = flag("vit_small", "any timm name of a plain VisionTransformer, with or without a pretrained tag "
                      "(ViT, augreg, DeiT, DINO, DINOv2, CLIP-style ViTs, e.g. deit_small_patch16_224; not Swin, "
                      "EVA, distilled DeiT), or an alias: vit_small (384 wide, 12 deep, 6 heads), vit_tiny, "
                      "vit_base, vit_micro (CPU demos)", "experiment")
    pretrained: Optional[str] = flag(None, "θ0 through timm: a timm name with its pretrained tag (from the Hugging "
                                     "Face Hub or its local cache) or a .safetensors/.pth/.pt/.bin state dict",
                                     "experiment")
    seed: int = flag(0, "seeds the init, the val split, the data order and the random criterion", "experiment")
    # pruning
    ratio: float = flag(0.7, "fraction of the groups removed by the last state", "pruning", range="[0, 1)")
    head_ratio: Optional[float] = flag(None, "fraction of the attention heads removed (default: --ratio)",
                                       "pruning", range="[0, 1)", requires=STRUCTURED)
    mlp_ratio: Optional[float] = flag(None, "fraction of the MLP neurons removed (default: --ratio)", "pruning",
                                      range="[0, 1)", requires=STRUCTURED)
    target: str = flag("both", "which kinds of groups are pruned", "pruning", choices=("both", "heads", "mlp"),
                       requires=STRUCTURED)
    min_keep: int = flag(1, "groups of each kind every layer keeps", "pruning", range="[1, inf)",
                         requires=STRUCTURED)
    round_to: int = flag(1, "every layer keeps a multiple of N MLP neurons (heads stay whole): the multiple nearest "
                         "its share of the selection, the best by importance; --min_keep rounds up to N", "pruning",
                         range="[1, inf)", requires=STRUCTURED)
    states: int = flag(16, "states of the loop (state 0 trains the dense model)", "pruning", range="[1, inf)")
    epochs: int = flag(60, "epochs per state", "pruning", range="[1, inf)")
    pruned_epochs: Optional[int] = flag(None, "epochs of every state >= 1 (default: --epochs); with --states=2 "
                                        "the ticket's one retraining: --rewind=none (learning-rate rewinding, or "
                                        "fine-tuning with --retrain_lr) or --rewind=random (Scratch-B at a loop's "
                                        "compute)", "pruning", range="[1, inf)", requires=RETRAIN)
    schedule: str = flag("oneshot", "oneshot: every state >= 1 keeps 1 - ratio; geometric: state s keeps "
                         "(1 - ratio)^(s/(states-1))", "pruning", choices=("oneshot", "geometric"))
    rewind: str = flag("init", "what states >= 1 start from: init: θ0 (weight rewinding); epoch:K: weights, "
                       "optimizer and LR schedule after epoch K of state 0 (late rewinding; later states train "
                       "epochs K..E-1); none: the trained weights, the LR schedule restarts (learning-rate "
                       "rewinding, Renda et al. 2020; with --retrain_lr: fine-tuning); random: a fresh timm init "
                       "of --model from a stream of its own (Scratch, Liu et al. 2019)", "pruning",
                       choices=("init", "none", "random", "epoch:K"))
    criterion: str = flag("magnitude", "group importance: magnitude (L1 of the group's weights in and out), "
                          "l1/l2 (mean |activation| / RMS of the group's outputs over calibration batches), remain "
                          "(weights surviving a global unstructured magnitude prune at the same ratio), saliency "
                          "(|activation × gradient|), random", "pruning",
                          choices=("magnitude", "l1", "l2", "remain", "saliency", "random"), requires=STRUCTURED)
    sorting: str = flag("global", "global: rank the groups of every layer together; layerwise: inside each layer",
                        "pruning", choices=("global", "layerwise"), requires=STRUCTURED)
    calib_batches: int = flag(8, "training batches the l1, l2 and saliency criteria look at", "pruning",
                              range="[1, inf)", requires=STRUCTURED)
    # RSST
    reg_formula: str = flag("residual", "residual: the strength is --reg_residual, the same for every optimizer "
                            "and LR schedule; seed: the seed's coupled formula with g = --reg_granularity_prune",
                            "RSST", choices=("residual", "seed"), requires=RSST)
    reg_residual: float = flag(1e-3, "fraction of its norm a target keeps at the end of the state if only the "
                               "penalty acted on it (1 = no penalty)", "RSST", range="(0, 1]",
                               requires={**RSST, "reg_formula": ("residual",)})
    reg_schedule: str = flag("exp_custom_exponents", "shape of the penalty's growth over the state, λ(p)",
                             "RSST", choices=("x", "x^2", "x^3", "exp", "exp_custom", "exp_custom_exponents"),
                             requires=RSST)
    exponents: float = flag(4.0, "k of exp_custom_exponents: λ(p) = g·(e^(p^k) − 1)/(e − 1)", "RSST",
                            range="(0, inf)", requires={**RSST, "reg_schedule": ("exp_custom_exponents",)})
    reg_kind: str = flag("l2", "l2: shrink w (seed: grad += λ·w); group_lasso: proximal shrink of ‖w_g‖",
                         "RSST", choices=("l2", "group_lasso"), requires=RSST)
    reg_granularity_prune: float = flag(1.0, "g of the seed formula: λ at the end of the state", "RSST",
                                        range="[0, inf)", requires={**RSST, "reg_formula": ("seed",)})
    reg_reach: float = flag(1.0, "when the targets reach --reg_residual, as a fraction of the state: they are "
                            "hard-pruned there and the rest of the state trains the pruned network (1 = at the end, "
                            "the seed's timing)", "RSST", range="(0, 1]",
                            requires={**RSST, "reg_formula": ("residual",)})
    # optimisation (the seed's recipe; AdamW + cosine is the from-scratch recipe)
    optimizer: str = flag("sgd", "the optimizer of every state", "optimisation", choices=("sgd", "adamw"))
    lr: float = flag(0.01, "base learning rate of every state", "optimisation", range="(0, inf)")
    momentum: float = flag(0.9, "SGD momentum", "optimisation", range="[0, 1)", requires={"optimizer": ("sgd",)})
    weight_decay: float = flag(1e-4, "decoupled for AdamW; not on biases, norms and embeddings", "optimisation",
                               range="[0, inf)")
    lr_schedule: str = flag("multistep", "per state: multistep (×0.1 at 50% and 75% of its epochs), cosine, "
                            "constant", "optimisation", choices=("multistep", "cosine", "constant"))
    retrain_lr: Optional[str] = flag(None, "states >= 1 train at this constant learning rate, not --lr_schedule: "
                                     "final: State 0's last (multistep: 0.01 × --lr; cosine: near zero, so give "
                                     "a number, e.g. 0.01 × --lr), or VALUE; with --rewind=none: fine-tuning",
                                     "optimisation", choices=("final", "VALUE"), requires=RETRAIN)
    warmup_epochs: int = flag(0, "linear warm-up epochs at the start of every state", "optimisation", range="[0, inf)")
    label_smoothing: float = flag(0.0, "label smoothing of the cross-entropy loss", "optimisation", range="[0, 1)")
    batch_size: int = flag(128, "images per step (over all processes)", "optimisation", range="[1, inf)")
    aug: str = flag("crop_flip", "training augmentation: crop_flip (the seed's: pad S/8, crop, flip); finetune: "
                    "timm's fine-tuning recipe on the device (random-resized crop, flip, mixup/cutmix with soft "
                    "targets; --label_smoothing goes into the mixed targets)", "optimisation",
                    choices=("crop_flip", "finetune"))
    crop_scale_min: float = flag(0.08, "random-resized crop: smallest share of the image's area a crop covers "
                                 "(timm: 0.08; the largest is 1)", "optimisation", range="(0, 1]", requires=FINETUNE)
    crop_ratio_max: float = flag(4 / 3, "random-resized crop: aspect ratios are drawn log-uniformly in [1/r, r] "
                                 "(timm: 3/4 to 4/3)", "optimisation", range="[1, inf)", requires=FINETUNE)
    mixup_alpha: float = flag(0.8, "mixup's Beta(α, α) (0: off; timm's fine-tuning recipe: 0.8)", "optimisation",
                              range="[0, inf)", requires=FINETUNE)
    cutmix_alpha: float = flag(1.0, "cutmix's Beta(α, α) (0: off; timm: 1.0); with both on, each batch takes "
                               "one of them at random", "optimisation", range="[0, inf)", requires=FINETUNE)
    distill: str = flag("none", "states >= 1 learn from a frozen teacher too: state0: the final State-0 network "
                        "of this run; PATH: a timm state dict of --model (or a vitprune state_NN.pt) with this "
                        "data's classes; none", "optimisation")
    distill_temp: float = flag(1.0, "temperature T of the soft distillation (KL × T², Hinton et al. 2015)",
                               "optimisation", range="(0, inf)")
    distill_alpha: float = flag(0.5, "loss = α · T² · KL(teacher ‖ student) + (1 − α) · the label loss; the KL "
                                "is per image (Hinton et al.'s), so α weighs C times what it weighs in DeiT's "
                                "code, which also divides by the C classes", "optimisation", range="[0, 1]")
    # system
    kernels: str = flag("auto", "auto: Triton on CUDA, else PyTorch; triton: fail if it cannot run; torch: the "
                        "reference", "system", choices=("auto", "triton", "torch"),
                        kind="numerics")
    precision: str = flag("auto", "auto: bf16 autocast on CUDA, fp32 on CPU", "system",
                          choices=("auto", "fp32", "bf16"), kind="numerics")
    compile: bool = flag(False, "torch.compile the training forward", "system", kind="numerics")
    device: str = flag("auto", "where to train (auto: CUDA when available)", "system",
                       choices=("auto", "cpu", "cuda", "cuda:N"), kind="numerics")
    data_dir: str = flag("data", "where datasets are found or downloaded, and where image folders are cached "
                         "decoded", "system", kind="execution")
    data_loader: str = flag("auto", "tensor: the decoded set on the device; stream: DataLoader workers decode "
                            "every batch (image folders too large to hold); auto: tensor when it fits the memory "
                            "budget. How to load, not what: may change on --resume",
                            "system", choices=("auto", "tensor", "stream"), kind="execution")
    max_image_pixels: int = flag(MAX_IMAGE_PIXELS, "an image folder's largest image (width × height, read from "
                                 "the header before decoding): a larger one stops the run, named in one line "
                                 "(default: PIL's decompression-bomb limit)", "system", range="[1, inf)",
                                 kind="execution")
    # logging
    out_dir: str = flag("runs", "the parent folder of run folders", "logging", kind="execution")
    name: Optional[str] = flag(None, "run folder name (default: derived from the config)", "logging",
                               kind="execution")
    wandb: str = flag("auto", "auto: online with credentials, else offline", "logging",
                      choices=("auto", "online", "offline", "disabled"), kind="execution")
    wandb_project: str = flag("vitprune", "W&B project", "logging", kind="execution")
    wandb_entity: Optional[str] = flag(None, "W&B entity (team or user)", "logging", kind="execution")
    resume: bool = flag(False, "continue the run folder from its newest checkpoint that verifies (last.pt, else "
                                "the state's start or end)", "logging", kind="execution")
    overwrite: bool = flag(False, "replace an existing run folder", "logging", kind="execution")

    @property
    def head_prune(self) -> float:
        """Fraction of heads removed in the final state."""
        return prune_ratios(self.ratio, self.head_ratio, self.mlp_ratio, self.target)[0]

    @property
    def mlp_prune(self) -> float:
        return prune_ratios(self.ratio, self.head_ratio, self.mlp_ratio, self.target)[1]

    @property
    def rewind_epoch(self) -> Optional[int]:
        """Epoch of state 0 whose end is the rewind point (0 = the initial weights), None = none
        (--rewind=none keeps the trained weights; random draws new ones)."""
        if self.rewind in ("none", "random"):
            return None
        if self.rewind == "init":
            return 0
        return int(self.rewind.split(":", 1)[1])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def prune_ratios(ratio: float, head_ratio=None, mlp_ratio=None, target: str = "both") -> tuple:
    """(fraction of the heads, of the MLP neurons) removed: head_ratio / mlp_ratio, else ratio;
    none of the kind `target` leaves alone. The flags' and vitprune.select's meaning."""
    return (0.0 if target == "mlp" else ratio if head_ratio is None else head_ratio,
            0.0 if target == "heads" else ratio if mlp_ratio is None else mlp_ratio)


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
# Flags that say how to execute, not what to compute: they may change on --resume.
EXECUTION_FLAGS = frozenset(name for name, f in FIELDS.items() if f.metadata["kind"] != "what")
# Execution flags that still change the floating-point results.
NUMERICS_FLAGS = frozenset(name for name, f in FIELDS.items() if f.metadata["kind"] == "numerics")


def applies(name: str, config: dict) -> bool:
    """Whether field `name` means something for a run with this config (its `requires`)."""
    return all(config.get(k, FIELDS[k].default) in values for k, values in FIELDS[name].metadata["requires"].items())


def dataset_name(dataset: str) -> str:
    """The data set as run names, W&B groups and tags show it: folder:PATH is the folder's name."""
    if dataset.startswith("folder:"):
        return os.path.basename(os.path.normpath(dataset[len("folder:"):]))
    return dataset


def before(name: str, config: dict):
    """The value flag `name` had in a run recorded before it existed (flags.BEFORE, else its default)."""
    value = BEFORE.get(name, FIELDS[name].default if name in FIELDS else None)
    return value(config) if callable(value) else value


def complete(config: dict) -> dict:
    """A recorded config with every flag it lacks at the value that flag had before it existed
    (where it applies to the run; elsewhere at its default)."""
    full = {**{k: before(k, config) for k in [*FIELDS, *BEFORE]}, **config}
    return {k: v if k in config or k not in FIELDS or applies(k, full) else FIELDS[k].default for k, v in full.items()}


def configuration(config: dict) -> dict:
    """The fields that define what a run computes, seed aside and only those that apply to
    it: runs that agree on these are seeds of one configuration."""
    return {k: v for k, v in config.items()
            if k in FIELDS and k not in EXECUTION_FLAGS and k != "seed" and applies(k, config)}


def base_type(f):
    """int, float, str or bool: the field's type with Optional removed."""
    return next(t for t in (get_args(f.type) or (f.type,)) if t is not type(None))


def check_value(name: str, value, label: str = None):
    """ConfigError unless `value` is valid for flag `name`; the line starts with `label`
    (default --name: the API names its argument)."""
    f, label = FIELDS[name], label or f"--{name}"
    meta, kind = f.metadata, base_type(f)
    if value is None:
        if f.default is not None:
            raise ConfigError(f"{label}: needs a value (default {f.default!r})")
        return
    if meta["choices"] and not _is_choice(value, meta["choices"]):
        valid = ", ".join(meta["choices"]).replace("VALUE", "VALUE (a number greater than 0)")
        raise ConfigError(f"{label}: unknown value {value!r}; choose from {valid}")
    if kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
            raise ConfigError(f"{label}: expected {'an integer' if kind is int else 'a number'}, got {value!r}")
        if meta["range"] and not meta["range"].contains(value):  # NaN is in no range
            raise ConfigError(f"{label}: {value!r} is not {meta['range'].describe()}")


def _is_choice(value, choices) -> bool:
    """value is one of the choices, or fills a pattern among them (folder:PATH: 'folder:' and a path;
    VALUE: a number greater than 0)."""
    prefixes = [c.split(":", 1)[0] + ":" for c in choices if ":" in c]
    return value in choices or (isinstance(value, str) and any(
        value.startswith(p) and len(value) > len(p) for p in prefixes)) or ("VALUE" in choices and _positive(value))


def _positive(text) -> bool:
    try:
        return 0 < float(text) < math.inf
    except (TypeError, ValueError):  # not a number
        return False


def validate(cfg: Config) -> Config:
    """Check every flag; raise ConfigError with one line naming the flag and valid values."""
    for name in FIELDS:
        check_value(name, getattr(cfg, name))
    config = cfg.to_dict()
    for name, f in FIELDS.items():
        if not applies(name, config) and config[name] != f.default:
            need = " and ".join(f"--{k}={'|'.join(v)}" for k, v in f.metadata["requires"].items())
            given = ", ".join(f"--{k}={config[k]}" for k in f.metadata["requires"])
            raise ConfigError(f"--{name}: applies only with {need}, not with {given}; drop it")
    _check_seed_formula(cfg)
    if cfg.rewind not in ("init", "none", "random"):
        k = cfg.rewind.split(":", 1)[1] if cfg.rewind.startswith("epoch:") else ""
        if not k.isdigit() or int(k) >= cfg.epochs:  # K = epochs would leave later states no epoch
            raise ConfigError(f"--rewind: {cfg.rewind!r} is not valid; choose from init, none, random, "
                              f"epoch:K with 0 <= K < --epochs ({cfg.epochs})")
    for name, what in (("pruned_epochs", "the epochs"), ("retrain_lr", "the learning rate")):
        if getattr(cfg, name) is not None and cfg.states < 2:
            raise ConfigError(f"--{name}: sets {what} of states >= 1, and --states={cfg.states} has none; "
                              f"choose --states >= 2 or drop it")
    if cfg.device.startswith("cuda:") and not cfg.device[5:].isdigit():
        raise ConfigError(f"--device: unknown value {cfg.device!r}; choose from auto, cpu, cuda, cuda:N")
    if cfg.resume and cfg.overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: --resume continues the run "
                          "folder, --overwrite replaces it")
    if cfg.name is not None and (not cfg.name or os.sep in cfg.name or cfg.name in (".", "..")):
        raise ConfigError(f"--name: {cfg.name!r} is not a folder name")
    check_folder("out_dir", cfg.out_dir, writable=True)
    if cfg.model not in ALIASES:  # the aliases need no timm
        _check_model(cfg.model)
    if cfg.pretrained is not None:
        check_pretrained(cfg.pretrained)
    _check_data(cfg)
    _check_recipe(cfg)
    return cfg


def _check_seed_formula(cfg: Config):
    """The seed's formula diverges when a step's penalty alone overshoots: with SGD (momentum
    μ) once lr·g ≥ 2(1 + μ), with AdamW's decoupled shrink once lr·g ≥ 2 (|1 − lr·λ| ≥ 1)."""
    if cfg.method != "rsst" or cfg.reg_formula != "seed" or cfg.reg_kind != "l2":
        return
    bound = 2 * (1 + cfg.momentum) if cfg.optimizer == "sgd" else 2.0
    if cfg.lr * cfg.reg_granularity_prune >= bound:
        raise ConfigError(f"--reg_granularity_prune: g = {cfg.reg_granularity_prune:g} with --lr={cfg.lr:g} gives "
                          f"lr·g = {cfg.lr * cfg.reg_granularity_prune:g} >= {bound:g}, where the seed's penalty "
                          f"diverges with --optimizer={cfg.optimizer}; choose g < {bound / cfg.lr:g} or the default "
                          f"--reg_formula=residual")


def _check_data(cfg: Config):
    """The data flags together: geometry, the validation split's form, the folder and loader."""
    if cfg.img_size % cfg.patch_size:
        raise ConfigError(f"--img_size: {cfg.img_size} is not divisible by --patch_size={cfg.patch_size}; "
                          f"choose sizes such as 32/4 or 224/16")
    if cfg.val_size >= 1 and cfg.val_size != int(cfg.val_size):
        raise ConfigError(f"--val_size: {cfg.val_size:g} is neither a fraction below 1 (e.g. 0.1) nor a whole "
                          f"number of images (e.g. 5000)")
    check_data_flags(cfg.dataset, cfg.data_dir, cfg.data_loader)


def _check_recipe(cfg: Config):
    """The recipe's flags together: every process takes an equal share of a batch, mixup pairs
    images, distillation needs a teacher."""
    world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's processes: each takes a share of a batch
    if cfg.batch_size % world:
        raise ConfigError(f"--batch_size: {cfg.batch_size} must be divisible by the {world} processes")
    if cfg.aug == "finetune" and (cfg.mixup_alpha or cfg.cutmix_alpha) and (cfg.batch_size // world) % 2:
        if world == 1:
            raise ConfigError(f"--batch_size: {cfg.batch_size} is odd; mixup/cutmix pair the images of a batch: "
                              f"give an even size or --mixup_alpha=0 --cutmix_alpha=0")
        raise ConfigError(f"--batch_size: {cfg.batch_size} over {world} processes leaves an odd share; "
                          f"mixup/cutmix pair the images of a batch: give a multiple of {2 * world}")
    if cfg.distill not in ("none", "state0"):
        if not os.path.isfile(cfg.distill) or not os.access(cfg.distill, os.R_OK):
            raise ConfigError(f"--distill: {cfg.distill!r} is not a readable file; choose from none, state0, "
                              f"PATH (a .pth/.pt/.safetensors state dict of --model={cfg.model})")
    elif cfg.distill == "state0" and cfg.states < 2:
        raise ConfigError(f"--distill: state0 teaches states >= 1, and --states={cfg.states} has none; "
                          f"choose --states >= 2 or --distill=none")
    if cfg.distill == "none":
        for name in ("distill_temp", "distill_alpha"):
            if getattr(cfg, name) != FIELDS[name].default:
                raise ConfigError(f"--{name}: applies only with --distill=state0|PATH, not with --distill=none; "
                                  f"drop it")


def _check_model(name: str) -> int:
    """--model must be a plain timm ViT (zoo.check_model): its patch size, or ConfigError."""
    from vitprune.zoo import check_model
    try:
        return check_model(name)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _model_defaults(flags: dict) -> dict:
    """Fill --img_size and --patch_size when not given: with --pretrained the weights' input
    size; a timm name (or an alias with --pretrained) takes its own patch size."""
    model, pretrained = flags.get("model", FIELDS["model"].default), flags.get("pretrained")
    if not isinstance(model, str) or (pretrained is not None and not isinstance(pretrained, str)):
        return flags  # validation names the bad value
    if ("img_size" in flags and "patch_size" in flags) or (model in ALIASES and pretrained is None):
        return flags
    if pretrained is not None:
        check_pretrained(pretrained)  # first: it may fail before torch loads
    from vitprune.zoo import pretrained_cfg
    flags = dict(flags)
    if "patch_size" not in flags:
        flags["patch_size"] = _check_model(model)
    if "img_size" not in flags and pretrained is not None:
        size = (pretrained_cfg(model, pretrained) or {}).get("input_size")
        if size:
            flags["img_size"] = size[-1]
    return flags


def _coerce(name: str, value):
    """Fire reads --ratio=1 as int and --name=123 as int: give the value its field's type."""
    kind = base_type(FIELDS[name])
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is str and value is not None and not isinstance(value, str):
        return str(value)
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(f"--{name}: expected true or false, got {value!r}")
    return value


def from_flags(flags: dict) -> Config:
    """Build and validate a Config from command-line flags (names exactly as the fields)."""
    unknown = sorted(set(flags) - set(FIELDS))
    if unknown:
        near = difflib.get_close_matches(unknown[0], FIELDS, n=1)
        hint = f"did you mean --{near[0]}? " if near else ""
        raise ConfigError(f"--{unknown[0]}: unknown flag; {hint}`python -m vitprune run --help` lists the flags")
    flags = _model_defaults({k: _coerce(k, v) for k, v in flags.items()})
    return validate(Config(**flags))
