"""The training loss: cross-entropy on labels (or on mixup's soft targets), plus, with
--distill, soft distillation from a frozen teacher (Hinton et al. 2015).

    loss = α · T² · KL(softmax(t / T) ‖ softmax(s / T)) + (1 − α) · CE(s, target)

The KL is each image's full KL, averaged over the batch, as Hinton et al.'s. DeiT's code
divides the summed KL by batch × classes instead, so at one α its soft term weighs 1/C of
this one: α' = α / (α + C·(1 − α)) here weighs it as DeiT's α does. The teacher is
the final State-0 network of the run (--distill=state0) or an external checkpoint, frozen, in
eval mode, run under the training step's autocast on the same (augmented, mixed) images.
"""
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from vitprune.config import Config
from vitprune.errors import ConfigError
from vitprune.model import build_model, set_kernels
from vitprune.structure import Structure, apply_structure, count


class Teacher(NamedTuple):
    model: torch.nn.Module
    flops: int  # forward FLOPs per image (what a distilled step adds to the compute)


def load_teacher(cfg: Config, run_dir: Path, num_classes: int, device, masked_linear) -> Teacher:
    """The frozen teacher --distill names: state0 = checkpoints/state_00.pt of this run; else a
    file holding a state dict of --model (plain, under 'model'/'state_dict', or a vitprune
    state checkpoint, whose structure is applied)."""
    path = run_dir / "checkpoints" / "state_00.pt" if cfg.distill == "state0" else Path(cfg.distill)
    ck = _read(path)
    sd = ck.get("model", ck.get("state_dict", ck))
    model = build_model(cfg.model, num_classes, cfg.img_size, cfg.patch_size)
    try:
        model.load_state_dict({k.removeprefix("module."): v for k, v in sd.items()})
    except RuntimeError as e:
        raise ConfigError(f"--distill: {path} is not a {cfg.model} with {num_classes} classes at {cfg.img_size} px "
                          f"({str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e})") from None
    structure = Structure.from_state_dict(ck["structure"]) if "structure" in ck else Structure.full(model)
    apply_structure(model, structure)
    set_kernels(model, masked_linear)
    model.to(device).eval().requires_grad_(False)
    return Teacher(model, count(model, structure)["flops_alive"])


def _read(path: Path) -> dict:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"--distill: cannot read {path} ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def training_loss(cfg: Config, teacher: Teacher = None):
    """loss(logits, x, target) of a training step: target holds labels or soft targets [B, C]."""
    smoothing = 0.0 if cfg.aug == "finetune" else cfg.label_smoothing  # finetune: in the soft targets

    def loss(logits, x, target):
        ce = F.cross_entropy(logits, target, label_smoothing=smoothing)
        if teacher is None:
            return ce
        with torch.no_grad():
            t_logits = teacher.model(x)
        return cfg.distill_alpha * soft_kl(logits, t_logits, cfg.distill_temp) + (1 - cfg.distill_alpha) * ce
    return loss


def soft_kl(logits, teacher_logits, temp: float):
    """T² · KL(softmax(t / T) ‖ softmax(s / T)), averaged over the batch."""
    return F.kl_div(F.log_softmax(logits.float() / temp, 1), F.log_softmax(teacher_logits.float() / temp, 1),
                    reduction="batchmean", log_target=True) * temp * temp
