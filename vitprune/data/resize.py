"""The one resize rule of training and evaluation: a box of each image to size × size with the
model's interpolation (the weights' own: bilinear or bicubic), antialiased wherever it downsamples.

It is torchvision's resize with antialias=True (PIL's filters: a triangle for bilinear, Keys'
cubic with a = -0.5 for bicubic, widened by the downscale factor when downsampling, the taps
limited to the box and renormalised) of each image's crop box, as two weight matrices per image:
out = Wy · x · Wxᵀ, one batched matmul each, flips as reversed rows of Wx (on CUDA these fp32
matmuls use TF32 as the run's others do: finer than the bf16 the model then reads). Evaluation
resizes whole images with it (core.model_input), --aug=finetune's random-resized crops their
boxes (augment.resized_crop): the model never sees training images resampled another way than
the images it is tested on.
"""
import functools

import torch

INTERPOLATIONS = ("bilinear", "bicubic")


def _filter(t: torch.Tensor, interpolation: str) -> torch.Tensor:
    t = t.abs()
    if interpolation == "bilinear":
        return (1 - t).clamp(min=0)
    a = -0.5  # PIL's and torchvision's antialiased bicubic (Keys 1981)
    return torch.where(t < 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                       torch.where(t < 2, a * (((t - 5) * t + 8) * t - 4), torch.zeros_like(t)))


def weights(start: torch.Tensor, extent: torch.Tensor, size: int, length: int, interpolation: str) -> torch.Tensor:
    """[B, size, length]: output pixel i of box b (source pixels start .. start + extent - 1 of
    `length`) as weights over the source pixels; each row sums to 1."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation {interpolation!r}: choose from {', '.join(INTERPOLATIONS)}")
    start, extent = start.to(torch.float32), extent.to(torch.float32)
    scale = (extent / size)[:, None, None]  # source pixels per output pixel
    stretch = scale.clamp(min=1.0)  # downsampling widens the filter: the antialiasing
    out = torch.arange(size, device=start.device, dtype=torch.float32)[None, :, None]
    centre = start[:, None, None] + (out + 0.5) * scale
    src = torch.arange(length, device=start.device, dtype=torch.float32)[None, None, :]
    w = _filter((src + 0.5 - centre) / stretch, interpolation)
    inside = (src >= start[:, None, None]) & (src < (start + extent)[:, None, None])  # the crop's own pixels
    w = torch.where(inside, w, torch.zeros_like(w))
    return w / w.sum(-1, keepdim=True)


def resize(x: torch.Tensor, boxes: torch.Tensor, size: int, interpolation: str, flips=None) -> torch.Tensor:
    """Images [B, C, H, W] (uint8 or float) -> float [B, C, size, size], in their value range:
    box (top, left, h, w) of each image resized, flipped left-right where `flips`."""
    boxes = boxes.to(x.device)
    top, left, h, w = boxes.unbind(1)
    wy = weights(top, h, size, x.shape[-2], interpolation)
    wx = weights(left, w, size, x.shape[-1], interpolation)
    if flips is not None:
        wx = torch.where(flips.to(x.device)[:, None, None], wx.flip(1), wx)
    return wy[:, None] @ x.float() @ wx[:, None].transpose(-1, -2)


@functools.lru_cache(maxsize=16)
def _whole_weights(height: int, width: int, size: int, interpolation: str, device: torch.device):
    zero = torch.zeros(1, device=device)
    return weights(zero, zero + height, size, height, interpolation), weights(zero, zero + width, size, width, interpolation)


def resize_whole(x: torch.Tensor, size: int, interpolation: str) -> torch.Tensor:
    """Every whole image of x [B, C, H, W] resized (resize() of the box (0, 0, H, W)): the weights
    are made once per shape and device, not per batch, and broadcast over the batch."""
    wy, wx = _whole_weights(x.shape[-2], x.shape[-1], size, interpolation, x.device)
    return wy[:, None] @ x.float() @ wx[:, None].transpose(-1, -2)
