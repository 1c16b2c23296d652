"""timm's fine-tuning augmentation (--aug=finetune) as batched tensor ops on the training device.

Random-resized crop: the boxes are drawn as torchvision's RandomResizedCrop.get_params draws
them (area share uniform in [scale_min, 1], aspect log-uniform in [1/r, r], the first of 10
tries that fits, else the central crop at the clamped aspect), for a whole epoch at once
from the epoch's generator; then every image of a batch is cropped, resized and flipped at
once by resize.py's rule, the one evaluation uses (torchvision's resize of the crop with the
model's interpolation, antialiased where it downsamples: CIFAR's 32 px at --img_size=16, say).
Mixup/cutmix is timm.data.Mixup, its numpy draws seeded by (seed, state, epoch, step): a
batch depends on nothing else, so a resumed run replays it.
"""
import math

import numpy as np
import torch

from vitprune.data.resize import resize

TRIES = 10  # torchvision's RandomResizedCrop.get_params


def crop_boxes(n: int, height: int, width: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
               generator: torch.Generator = None) -> torch.Tensor:
    """n crop boxes (top, left, h, w) int64 [n, 4], distributed as RandomResizedCrop.get_params's."""
    area = height * width
    target = area * torch.empty(n, TRIES).uniform_(scale[0], scale[1], generator=generator)
    log_r = torch.empty(n, TRIES).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = torch.exp(log_r)
    # torchvision: int(round(...)); round half to even, as Python's round
    w = torch.round(torch.sqrt(target * aspect)).long()
    h = torch.round(torch.sqrt(target / aspect)).long()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.where(ok.any(1), ok.long().argmax(1), -1)  # the first try that fits
    u = torch.rand(n, TRIES, 2, generator=generator)  # the offsets of every try
    pick = first.clamp(min=0)[:, None]
    h, w = h.gather(1, pick)[:, 0], w.gather(1, pick)[:, 0]
    uy, ux = u[torch.arange(n), pick[:, 0]].unbind(1)
    top = (uy * (height - h + 1)).long().clamp(max=height - h)  # uniform integer in [0, H - h]
    left = (ux * (width - w + 1)).long().clamp(max=width - w)
    # No try fitted: the central crop at the aspect clamped to the range (torchvision's fallback).
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fh, fw = height, int(round(height * max(ratio)))
    else:
        fw, fh = width, height
    miss = first < 0
    h, w = torch.where(miss, fh, h), torch.where(miss, fw, w)
    top, left = torch.where(miss, (height - fh) // 2, top), torch.where(miss, (width - fw) // 2, left)
    return torch.stack([top, left, h, w], 1)


def resized_crop(x: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: int,
                 interpolation: str = "bilinear") -> torch.Tensor:
    """Crop every image of uint8 [B, 3, H, W] to its box, resize it to size × size (resize.py:
    the evaluation's interpolation, antialiased where it downsamples) and flip it where `flips`:
    float [B, 3, size, size] in the 0..255 range."""
    return resize(x, boxes, size, interpolation, flips)


def finetune_draws(n: int, size: int, generator: torch.Generator, scale, ratio):
    """An epoch's augmentation of n images of side `size`: (crop boxes [n, 4], flips [n])."""
    return crop_boxes(n, size, size, scale, ratio, generator), torch.rand(n, generator=generator) < 0.5


class Mixer:
    """timm's Mixup/CutMix with label smoothing: (x, labels) -> (mixed x, soft targets [B, C]).

    timm draws from numpy's global generator; here it is seeded per batch from (seed, state,
    epoch, step) and restored afterwards, so a batch's mix depends on nothing else."""

    def __init__(self, mixup_alpha: float, cutmix_alpha: float, label_smoothing: float, num_classes: int):
        from timm.data import Mixup
        self.mix = Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, label_smoothing=label_smoothing,
                         num_classes=num_classes) if mixup_alpha or cutmix_alpha else None
        self.smoothing, self.num_classes = label_smoothing, num_classes

    def __call__(self, x, y, seed: int, state: int, epoch: int, step: int):
        from timm.data.mixup import mixup_target
        if self.mix is None:  # both off: label smoothing only
            return x, mixup_target(y, self.num_classes, 1.0, self.smoothing)
        saved = np.random.get_state()
        np.random.seed((((seed * 1009 + state) * 100003 + epoch) * 1000003 + step) % 2 ** 32)
        # timm pairs image i with B−1−i (flip); this order makes that pair 2k with 2k + 1, so a
        # process's share of the global batch (even: config checks) mixes as one process would.
        n = len(x)
        order = torch.cat([torch.arange(0, n, 2), torch.arange(n - 1, 0, -2)]).to(x.device)
        try:
            mixed, target = self.mix(x[order], y[order])
        finally:
            np.random.set_state(saved)
        back = torch.argsort(order)
        return mixed[back], target[back]
