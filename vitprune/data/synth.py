"""The built-in synthetic set (--dataset=synthetic): 10 classes of generated, learnable 32x32
images, 4,500 minus --val_size for training, 1,000 for test."""
import math

import torch

from vitprune.config import Config
from vitprune.data.core import Data
from vitprune.data.split import check_split, seeded_split
from vitprune.fingerprint import split_fingerprint

SYNTHETIC_SIZES = (4050, 450, 1000)  # train, val (10% of the 4,500-image pool), test


def load_synthetic(cfg: Config) -> Data:
    """The run's synthetic splits, on the CPU: --val_size of the pool drawn with the seed."""
    pool, test = SYNTHETIC_SIZES[0] + SYNTHETIC_SIZES[1], SYNTHETIC_SIZES[2]
    n_val = check_split(pool, cfg.val_size, cfg.batch_size)
    return synthetic(cfg.seed, sizes=(pool - n_val, n_val, test))


def synthetic(seed: int, sizes=SYNTHETIC_SIZES, num_classes: int = 10) -> Data:
    """A generated, learnable 32x32 RGB set of 10 classes: each class has its own pattern
    (horizontal, vertical or diagonal stripes, checkerboard, rings; random frequency and
    phase) and its own foreground hue (jittered, so neighbouring hues overlap), with
    Gaussian noise on top. The images are fixed (generator seed 0, for a given total size);
    only the val split uses `seed`.
    """
    n_train, n_val, n_test = sizes
    g = torch.Generator().manual_seed(0)
    x, y = _synthetic_images(n_train + n_val + n_test, num_classes, g)
    pool = n_train + n_val
    train, val = seeded_split(pool, n_val, seed)
    return Data(x[train], y[train], x[val], y[val], x[pool:], y[pool:], num_classes,
                split_fingerprint=split_fingerprint(val, range(n_test)))


def _synthetic_images(n, num_classes, g):
    y = torch.arange(n) % num_classes
    y = y[torch.randperm(n, generator=g)]
    pattern = y % 5
    r = torch.arange(32.0)
    yy, xx = r[:, None], r[None, :]
    freq = (0.35 + 0.35 * torch.rand(n, generator=g))[:, None, None]
    phase = (2 * math.pi * torch.rand(n, generator=g))[:, None, None]
    cx, cy = (8 + 16 * torch.rand(2, n, generator=g))[:, :, None, None]
    waves = torch.stack([
        torch.sin(freq * yy + phase).expand(n, 32, 32),
        torch.sin(freq * xx + phase).expand(n, 32, 32),
        torch.sin(freq * (xx + yy) / 1.4 + phase),
        torch.sin(freq * xx + phase) * torch.sin(freq * yy + phase) * 2,
        torch.sin(freq * torch.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) + phase),
    ])
    p = waves[pattern, torch.arange(n)].clamp(-1, 1)[:, None]  # [n, 1, 32, 32]
    # Foreground hue by class (10 hues around the wheel, neighbours overlap under jitter),
    # dark or light background by pattern parity: colour alone does not give the class.
    hue = 2 * math.pi * (y.float() / num_classes + 0.09 * torch.randn(n, generator=g))
    fg = 0.5 + 0.4 * torch.stack([torch.cos(hue), torch.cos(hue - 2.094), torch.cos(hue + 2.094)], 1)
    bg = (0.15 + 0.7 * (pattern % 2)).float()[:, None].expand(n, 3) + 0.1 * torch.randn(n, 3, generator=g)
    colors = torch.stack([fg, bg], 1)  # [n, 2, 3]
    fg, bg = colors[:, 0, :, None, None], colors[:, 1, :, None, None]
    img = bg + (fg - bg) * (p + 1) / 2 + 0.15 * torch.randn(n, 3, 32, 32, generator=g)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8), y
